"""The package as a user installs it: the configs ship inside it, so a built wheel installed away from
the source tree runs (slow: builds the wheel, runs a tiny pipeline); a user's own config folder adds an
experiment without editing the package (fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.slow
def test_a_users_config_dir_adds_an_experiment(tmp_path):
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "my_share.yaml").write_text("# @package _global_\nfeedback:\n  human_ratio: 0.3\nseed: 7\n")
    cmd = [
        sys.executable,
        "-m",
        "laffi_exp",
        "--config-dir",
        str(tmp_path / "my_conf"),
        "+experiment=my_share",
        "--cfg",
        "job",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "human_ratio: 0.3" in proc.stdout and "seed: 7" in proc.stdout


@pytest.mark.slow
def test_the_wheel_runs_outside_the_source_tree(tmp_path, cache_dir):
    wheels = tmp_path / "wheels"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(wheels),
        str(ROOT),
    ]
    done = subprocess.run(build, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = wheels.glob("laffi_exp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "laffi_exp/conf/config.yaml" in names and "laffi_exp/conf/hydra/launcher/slurm.yaml" in names

    site = tmp_path / "site"  # the wheel alone: its dependencies come from this environment
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    away = tmp_path / "elsewhere"  # no source tree here or above
    away.mkdir()
    env = _env(PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import laffi_exp; print(laffi_exp.__file__)"], cwd=away, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert where.stdout.strip().startswith(str(site)), where.stdout
    run = [sys.executable, "-m", "laffi_exp", *TINY, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={away / 'run'}"]
    done = subprocess.run(run, cwd=away, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((away / "run" / "metrics.json").read_text())
    assert metrics["test/total"] == 16 and (away / "run" / "adapter" / "adapter_model.safetensors").is_file()
