"""Sweeps: every experiment file runs (tiny), stage outputs are shared through the cache with keys that
change when and only when they should, parallel jobs share one cache, and a finished sweep re-runs
for free while a changed one is refused."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from laffi_exp.core.config import CONF_DIR
from laffi_exp.core.io import read_json, read_jsonl
from laffi_exp.pipeline import run
from laffi_exp.stages.cache import StageCache

from .conftest import TINY

# On the embedded tiny model; gemma_squad (a real LLM, real data) has its own test (test_gemma_squad.py).
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if p.stem != "gemma_squad")
ROOT = Path(__file__).resolve().parents[1]


def _sweep(name: str, sweep_dir: Path, cache_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    tiny = [o for o in TINY if not o.startswith("logger=")]  # the experiments' own loggers (csv + offline wandb)
    cmd = [
        sys.executable,
        "-m",
        "laffi_exp",
        f"+experiment={name}",
        *tiny,
        f"paths.cache_dir={cache_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        "seed=0,1",
        *extra,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _human_ids(cell: Path) -> set[str]:
    return {r["id"] for r in read_jsonl(cell / "feedback.jsonl") if r["source"] == "human"}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_tiny_and_reports(name, tmp_path, cache_dir):
    extra = ["feedback.human_ratio=0.25,1"] if name == "ablation_ratio" else []
    done = _sweep(name, tmp_path / "sweep", cache_dir, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "sweep"
    cells = read_json(sweep / "manifest.json")["cells"]
    ratios = ("0.25", "1") if name == "ablation_ratio" else ("0.5",)
    expected = {f"{m}_ratio{r}_seed{s}" for m in ("laffi", "sft") for r in ratios for s in (0, 1)}
    assert set(cells) == expected
    assert all(c["status"] == "finished" for c in cells.values())
    for file in ("results.csv", "summary.csv", "results.md", "ablation.png", "paired.csv"):
        assert (sweep / file).is_file(), file
    assert len((sweep / "results.csv").read_text().strip().splitlines()) == 1 + len(expected)
    # One offline wandb run per job, each in its own job dir.
    assert all(list((sweep / c / "wandb").glob("offline-run-*")) for c in expected)
    if name == "ablation_ratio":
        for seed in (0, 1):  # nested human sets across the jobs of one sweep
            low, high = (
                _human_ids(sweep / f"laffi_ratio0.25_seed{seed}"),
                _human_ids(sweep / f"laffi_ratio1_seed{seed}"),
            )
            assert low and low < high
        # SFT ignores the ratio: its cells of one seed share one trained adapter.
        a = read_json(sweep / "sft_ratio0.25_seed0" / "manifest.json")["stages"]["train"]
        b = read_json(sweep / "sft_ratio1_seed0" / "manifest.json")["stages"]["train"]
        assert a["key"] == b["key"] and not (a["hit"] and b["hit"])


@pytest.mark.slow
def test_a_finished_sweep_reruns_for_free_and_a_changed_one_is_refused(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    first = _sweep("compare_methods", sweep, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {c: (sweep / c / "metrics.json").stat().st_mtime_ns for c in read_json(sweep / "manifest.json")["cells"]}
    again = _sweep("compare_methods", sweep, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert said.count("already holds a finished run of this config") == len(before)
    assert "Stage cache" not in said  # nothing generated or trained, not even read from the cache
    assert {c: (sweep / c / "metrics.json").stat().st_mtime_ns for c in before} == before

    changed = _sweep("compare_methods", sweep, cache_dir, "trainer.max_steps=5")
    assert changed.returncode != 0
    assert "holds a finished run with a different config (trainer.max_steps: 4 -> 5)" in changed.stdout + changed.stderr
    assert {c: (sweep / c / "metrics.json").stat().st_mtime_ns for c in before} == before  # nothing overwritten


def _events(out: Path) -> dict[str, bool]:
    return {stage: e["hit"] for stage, e in read_json(out / "manifest.json")["stages"].items()}


def test_cache_keys_change_when_and_only_when_they_should(make_cfg, tmp_path):
    shared = [f"cache.dir={tmp_path / 'stages'}"]
    run(make_cfg(*shared, f"paths.output_dir={tmp_path / 'a'}"))
    assert not any(_events(tmp_path / "a").values())  # a fresh cache: everything computed

    # Display-only settings: everything comes from the cache.
    run(
        make_cfg(
            *shared,
            f"paths.output_dir={tmp_path / 'b'}",
            "evaluation.num_samples_logged=3",
            "trainer.log_every_n_steps=2",
        )
    )
    assert all(_events(tmp_path / "b").values())

    # Another human share: the base's answers are reused; training and what follows are not.
    run(make_cfg(*shared, f"paths.output_dir={tmp_path / 'c'}", "feedback.human_ratio=1.0"))
    assert _events(tmp_path / "c") == {
        "answer_train": True,
        "answer_validation": True,
        "train": False,
        "base_test": True,
        "test": False,
        "reflect": False,
        "base_na_probs": True,
        "na_probs": False,
    }

    # Another seed: same base answers (greedy), new adapter.
    run(make_cfg(*shared, f"paths.output_dir={tmp_path / 'd'}", "seed=3"))
    assert _events(tmp_path / "d")["answer_train"] and not _events(tmp_path / "d")["train"]

    # Another answer length: stage 1 and every evaluation generation change.
    run(make_cfg(*shared, f"paths.output_dir={tmp_path / 'e'}", "generation.max_new_tokens=5"))
    events = _events(tmp_path / "e")
    assert not events["answer_train"] and not events["base_test"]

    # SFT: never answers the training questions; shares the base evaluation.
    run(make_cfg(*shared, f"paths.output_dir={tmp_path / 'f'}", "method=sft"))
    assert _events(tmp_path / "f") == {
        "train": False,
        "base_test": True,
        "test": False,
        "base_na_probs": True,
        "na_probs": False,
    }


def _build_once(root: str, marker: str) -> str:
    def build(folder: Path) -> None:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (folder / "out.txt").write_text("built")

    entry = StageCache(root).get_or_build("demo", {"x": 1}, build)
    return (entry / "out.txt").read_text()


@pytest.mark.slow
def test_two_processes_on_one_cache_build_an_entry_once(tmp_path):
    marker = tmp_path / "builds.txt"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_build_once, [(str(tmp_path / "cache"), str(marker))] * 2)
    assert results == ["built", "built"]
    assert len(marker.read_text().splitlines()) == 1  # one built it, the other waited and read it
    entries = list((tmp_path / "cache" / "demo").iterdir())
    assert [p.name for p in entries if not p.name.endswith(".lock")] == [StageCache("").key({"x": 1})]


def test_a_failed_build_leaves_no_entry(tmp_path):
    cache = StageCache(tmp_path)

    def broken(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.get_or_build("demo", {"x": 2}, broken)
    assert not [p for p in (tmp_path / "demo").iterdir() if not p.name.endswith(".lock")]
    entry = cache.get_or_build("demo", {"x": 2}, lambda folder: (folder / "ok.txt").write_text("ok"))
    assert (entry / "ok.txt").read_text() == "ok"


@pytest.mark.slow
def test_submitit_local_runs_each_job_in_its_own_process(tmp_path, cache_dir):
    done = _sweep("compare_methods", tmp_path / "sweep", cache_dir, "hydra/launcher=submitit_local", "seed=0")
    assert done.returncode == 0, done.stderr[-3000:]
    cells = read_json(tmp_path / "sweep" / "manifest.json")["cells"]
    assert set(cells) == {"laffi_ratio0.5_seed0", "sft_ratio0.5_seed0"}
    assert all(c["status"] == "finished" for c in cells.values())
    logs = list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # one submitit job (a process of its own) per cell
    assert (tmp_path / "sweep" / "results.csv").is_file()


@pytest.mark.slow
def test_the_slurm_preset_takes_partition_gpus_and_time_from_config(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "laffi_exp",
        "+experiment=ablation_ratio",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu-a100",
        "hydra.launcher.timeout_min=600",
        "hydra.launcher.gpus_per_node=4",
        "trainer=gpu",
        "--cfg",
        "hydra",
    ]
    shown = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    import yaml

    launcher = yaml.safe_load(shown.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["partition"], launcher["timeout_min"], launcher["gpus_per_node"]) == ("gpu-a100", 600, 4)


def test_an_edited_input_file_makes_a_finished_cell_refused(make_cfg, tmp_path):
    from laffi_exp.core.errors import ConfigError
    from laffi_exp.runs import sweep

    data = tmp_path / "data.json"
    data.write_text('{"data": []}')
    cfg = make_cfg("dataset=squad_json", f"dataset.path={data}")
    out = tmp_path / "run"
    sweep.mark(cfg, out, "finished")
    (out / "metrics.json").write_text('{"test/exact": 1.0}')
    assert sweep.finished_metrics(cfg, out) == {"test/exact": 1.0}  # same config, same file: skipped
    data.write_text('{"data": [], "version": "v2"}')
    with pytest.raises(ConfigError, match="different config .*the contents of dataset.path"):
        sweep.finished_metrics(cfg, out)


def test_a_second_job_in_the_same_folder_stops_at_once(tmp_path):
    from laffi_exp.core.errors import ConfigError
    from laffi_exp.runs import sweep

    with (
        sweep.claim(tmp_path / "cell"),
        pytest.raises(ConfigError, match="another job is running in this folder"),
        sweep.claim(tmp_path / "cell"),
    ):
        pass
    with sweep.claim(tmp_path / "cell"):  # released when the first job ends
        pass
