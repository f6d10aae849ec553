"""`python -m laffi_exp` as a user runs it: a tiny run end to end, and bad inputs that end in one clear
line (exit code != 0, no traceback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from laffi_exp.__main__ import run_or_exit

from .conftest import TINY, TINYLLAMA, needs


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "laffi_exp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _cli_run(tmp_path, cache_dir, *loggers: str):
    run_dir = tmp_path / "run"
    proc = cli(*TINY, *loggers, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/exact" in metrics and "base/exact" in metrics
    assert "LaFFi run finished" in proc.stdout and str(run_dir) in proc.stdout
    return run_dir


def test_cli_run_writes_hydra_dir_and_summary(tmp_path, cache_dir):
    _cli_run(tmp_path, cache_dir)  # TINY logs to CSV only


@pytest.mark.slow
def test_cli_run_with_the_default_loggers_writes_an_offline_wandb_run(tmp_path, cache_dir):
    run_dir = _cli_run(tmp_path, cache_dir, "logger=default")  # CSV and wandb
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("*.wandb"))


# Every bad input a run can meet, each ending in one `error:` line naming the key or file, exit code 2,
# before any stage has run. In process (fast); the command line itself is tested on a few rows below.
BAD = [
    (["feedback.human_ratio=1.5"], "feedback.human_ratio"),
    (["dataset.num_train=-3"], "dataset.num_train"),
    (["dataset=squad_json", "dataset.path=/does/not/exist.json"], "dataset.path"),
    (["generation.batch_size=0"], "generation.batch_size"),
    (["method.lora.r=0"], "method.lora.r"),
    (["method.optimizer.lr=-1"], "method.optimizer"),
    (["prompt.answer_template='Q: {question} {nope}'"], "prompt.answer_template: unknown field {nope}"),
    (["model.max_length=8"], "model.max_length: 8 tokens"),  # found once the tokenizer is loaded
]
BAD_HF = [  # the same with a transformers model: the tiny embedded keys do not apply
    (["model=hf"], "model.name_or_path"),
    (["model=hf", "model.name_or_path=/does/not/exist"], "model.name_or_path"),
]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle", "embedded"),
    [(a, n, True) for a, n in BAD] + [(a, n, False) for a, n in BAD_HF],
    ids=[a[-1] for a, _ in BAD + BAD_HF],
)
def test_bad_input_is_one_clear_line(args, needle, embedded, make_cfg, tmp_path, capsys):
    cfg = make_cfg(*args, embedded=embedded)
    with pytest.raises(SystemExit) as stop:
        run_or_exit(cfg)
    assert stop.value.code == 2
    assert needle in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "feedback_report.json").exists() and not (tmp_path / "run" / "metrics.json").exists()


@needs(TINYLLAMA)
def test_a_truncated_weights_file_is_one_line_naming_it(tmp_path, make_cfg, capsys):
    broken = tmp_path / "broken_model"
    shutil.copytree(TINYLLAMA, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])  # a download cut short
    with pytest.raises(SystemExit) as stop:
        run_or_exit(make_cfg("model=hf", f"model.name_or_path={broken}", embedded=False))
    assert stop.value.code == 2
    assert f"{weights} is damaged or incomplete" in _one_error_line(capsys.readouterr().err)


# On the command line (slow): errors Hydra itself finds, and every row above again.
CLI_BAD = [
    pytest.param(["no_such_key=3"], "no_such_key", id="no_such_key=3", marks=pytest.mark.slow),
    pytest.param(["model=no_such_model"], "no_such_model", id="model=no_such_model", marks=pytest.mark.slow),
    *(pytest.param(a, n, id=f"cli:{a[-1]}", marks=pytest.mark.slow) for a, n in BAD + BAD_HF),
]


@pytest.mark.parametrize(("args", "needle"), CLI_BAD)
def test_bad_input_on_the_command_line_is_one_line_and_exit_code_2(args, needle, tmp_path, cache_dir):
    tiny = TINY if args[0].startswith(("model.", "generation.", "method.", "prompt.", "feedback.", "dataset.")) else []
    proc = cli(
        *tiny, *args, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}", "logger=csv", cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
