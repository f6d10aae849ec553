"""Training that survives: checkpoints every `cache.checkpoint_every` optimizer steps, and the same run
started again after it died resumes from the last one and ends exactly as the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from laffi_exp.pipeline import run
from laffi_exp.stages.train_module import LoRAFineTuner

# 24 training examples in batches of 4: 6 batches an epoch; validation every 2 steps; checkpoints every 3
RESUMABLE = ["trainer.max_steps=10", "cache.checkpoint_every=3"]


class Killed(RuntimeError):
    pass


def _stage_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "stages" / "adapters").glob("*/*") if p.is_file()} | {
        p.name: p.read_bytes() for p in (root / "stages" / "adapters").glob("*/adapter/*")
    }


def _result(root: Path, metrics: dict) -> tuple[dict, dict[str, bytes]]:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}, _stage_files(root)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    from hydra import compose, initialize_config_dir

    from .conftest import CONF_DIR, TINY

    root = tmp_path_factory.mktemp("uninterrupted")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                *TINY,
                *RESUMABLE,
                f"paths.cache_dir={cache_dir}",
                f"paths.output_dir={root / 'run'}",
                f"cache.dir={root / 'stages'}",
            ],
        )
    return _result(root, run(cfg))


@pytest.mark.parametrize(
    "killed_at",
    [pytest.param(5, marks=pytest.mark.slow), 7, pytest.param(10, marks=pytest.mark.slow)],
    ids=["mid-epoch", "after-an-epoch-and-a-validation", "last-step"],
)
def test_a_killed_training_resumes_and_ends_as_the_uninterrupted_one(
    killed_at, uninterrupted, make_cfg, tmp_path, monkeypatch
):
    step = LoRAFineTuner.training_step

    def dies(self, batch, batch_idx):
        if self.trainer.global_step == killed_at - 1:
            raise Killed(f"killed before step {killed_at}")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(LoRAFineTuner, "training_step", dies)
    with pytest.raises(Killed):
        run(make_cfg(*RESUMABLE))
    saved = list((tmp_path / "stages" / "checkpoints").glob("*/last.ckpt"))
    assert len(saved) == 1 and not list(saved[0].parent.glob("*.tmp*"))
    monkeypatch.setattr(LoRAFineTuner, "training_step", step)
    resumed = _result(tmp_path, run(make_cfg(*RESUMABLE)))
    assert resumed[0] == uninterrupted[0]
    assert resumed[1] == uninterrupted[1]  # adapter weights, loss history, train.json: byte for byte
    assert not list((tmp_path / "stages" / "checkpoints").glob("*/*"))  # removed once the adapter is cached
    history = [json.loads(line) for line in resumed[1]["history.jsonl"].decode().splitlines()]
    assert [r["step"] for r in history if "val/loss" in r["metrics"]] == [1, 3, 5, 7, 9]


# -- The command itself, killed for real ----------------------------------------------------------------
# The shipped embedded base, 64 training questions in batches of 16 (4 an epoch), 100 steps, a checkpoint
# every 5; small held-out splits so that the training is most of the run.
COMMAND = [
    "dataset.num_train=64",
    "dataset.num_val=16",
    "dataset.num_eval=32",
    "trainer.max_steps=100",
    "trainer.val_check_interval=25",
    "cache.checkpoint_every=5",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def _start(root: Path, cache_dir: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "laffi_exp",
        *COMMAND,
        f"paths.cache_dir={cache_dir}",
        f"cache.dir={root / 'stages'}",
        f"hydra.run.dir={root / 'run'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _outcome(root: Path) -> tuple[dict, dict[str, bytes]]:
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    files = {
        str(p.relative_to(root / "stages")): p.read_bytes()
        for p in sorted((root / "stages").rglob("*"))
        if p.is_file()
        and "checkpoints" not in p.parts
        and not p.name.endswith(".lock")
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }  # a killed run's temp folders
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}, files


def _same(a: tuple[dict, dict[str, bytes]], b: tuple[dict, dict[str, bytes]]) -> None:
    assert a[0] == b[0]  # metrics.json, time keys aside
    assert sorted(a[1]) == sorted(b[1])  # the same stage files
    assert [name for name in a[1] if a[1][name] != b[1][name]] == []  # byte for byte


def _train_seconds(root: Path) -> float:
    return json.loads((root / "run" / "manifest.json").read_text())["stages"]["train"]["seconds"]


def _step(root: Path) -> int:
    saved = list((root / "stages" / "checkpoints").glob("*/last.json"))
    try:
        return json.loads(saved[0].read_text())["step"] if saved else 0
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("whole")
    done = _finish(_start(root, cache_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, _outcome(root), _train_seconds(root)


@pytest.mark.slow
def test_sigkill_at_60_percent_of_training_resumes_to_the_same_run_in_half_the_time(whole_run, tmp_path, cache_dir):
    _, whole, whole_seconds = whole_run
    proc = _start(tmp_path, cache_dir)
    while _step(tmp_path) < 60 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before 60% of its training: make it longer"
    again = _finish(_start(tmp_path, cache_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Training: resuming from" in again.stdout + again.stderr
    _same(_outcome(tmp_path), whole)
    assert _train_seconds(tmp_path) <= 0.5 * whole_seconds
    assert not list((tmp_path / "stages" / "checkpoints").glob("*/*"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_writes_a_checkpoint_and_exits_cleanly_then_the_run_resumes(
    signum, whole_run, tmp_path, cache_dir
):
    _, whole, _ = whole_run
    proc = _start(tmp_path, cache_dir)
    while _step(tmp_path) < 20 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signum)
    stopped = _finish(proc)
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("stopped:")]
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0] and "the same command resumes it" in lines[0]
    assert _step(tmp_path) > 20  # written when the signal came, not only at the last multiple of 5
    again = _finish(_start(tmp_path, cache_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    _same(_outcome(tmp_path), whole)


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.15, 0.35, 0.55, 0.75, 0.9, 0.98])
def test_sigkill_at_any_moment_then_the_same_command_gives_the_same_run(share, whole_run, tmp_path, cache_dir):
    """Killed at a share of the whole run's wall time: in stage 1, stage 2, training, evaluation, the end."""
    whole_root, whole, _ = whole_run
    seconds = json.loads((whole_root / "run" / "metrics.json").read_text())["time/seconds"]
    proc = _start(tmp_path, cache_dir)
    try:
        proc.wait(timeout=share * (seconds + 8))  # + 8 s: the imports before the run's clock starts
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    again = _finish(_start(tmp_path, cache_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    _same(_outcome(tmp_path), whole)


def _generations(stages: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(stages)): p.read_bytes()
        for kind in ("generations", "likelihoods")
        for p in sorted((stages / kind).glob("*/*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_killed_generation_stage_resumes_at_its_first_unfinished_chunk(make_cfg, tmp_path, monkeypatch, caplog):
    import laffi_exp.stages.setup as stage_setup

    small = ["generation.batch_size=4", "trainer.max_steps=2"]  # 24 training questions: 6 batches, 6 chunks
    whole = run(
        make_cfg(
            *small, "cache.chunk_batches=0", f"cache.dir={tmp_path / 'whole'}", f"paths.output_dir={tmp_path / 'w'}"
        )
    )
    generate, calls = stage_setup.generate, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise Killed("killed in the fourth chunk of stage 1")
        return generate(*args, **kwargs)

    monkeypatch.setattr(stage_setup, "generate", dies)
    chunked = [
        *small,
        "cache.chunk_batches=1",
        f"cache.dir={tmp_path / 'chunked'}",
        f"paths.output_dir={tmp_path / 'c'}",
    ]
    with pytest.raises(Killed):
        run(make_cfg(*chunked))
    partial = list((tmp_path / "chunked" / "partial" / "generations").glob("*/chunk-*.json"))
    assert len(partial) == 3  # the three chunks finished before the kill
    monkeypatch.setattr(stage_setup, "generate", generate)
    with caplog.at_level("INFO", logger="laffi_exp.stages.cache"):
        again = run(make_cfg(*chunked))
    assert "3 of 6 chunks already done" in caplog.text
    assert {k: v for k, v in again.items() if not k.startswith("time/")} == {
        k: v for k, v in whole.items() if not k.startswith("time/")
    }
    # every generation and likelihood stage file, byte for byte (chunked or not, killed or not)
    assert _generations(tmp_path / "chunked") == _generations(tmp_path / "whole")
    assert not list((tmp_path / "chunked" / "partial").rglob("chunk-*"))
