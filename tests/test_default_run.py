"""The README's main command on the embedded default, for real (slow: builds the base model once).

The quality bar of the default: fine-tuning beats the untrained base by >= 10 EM points (for LaFFi in
the direct or the reflect protocol, whichever wins; see README, Results)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _run(method: str, tmp_path) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "laffi_exp", f"method={method}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    print(
        f"{method}: base {metrics['base/exact']:.1f} direct {metrics['test/exact']:.1f} "
        f"reflect {metrics.get('test_reflect/exact', float('nan')):.1f} in {time.time() - start:.0f} s"
    )
    for name in ("predictions.json", "base_predictions.json", "metrics.json", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    return metrics


def test_default_sft_run_beats_the_base_by_10_em(tmp_path):
    metrics = _run("sft", tmp_path)
    assert metrics["test/exact"] >= metrics["base/exact"] + 10.0


@pytest.fixture(scope="module")
def laffi_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("laffi")
    return _run("laffi", out), out


def test_default_laffi_run_writes_everything(laffi_run):
    metrics, out = laffi_run
    for name in ("answers.jsonl", "feedback.jsonl", "reflect_predictions.json"):
        assert (out / "run" / name).is_file(), name
    assert 0.3 < metrics["feedback/human_share"] < 0.7


def test_default_laffi_run_beats_the_base_by_10_em(laffi_run):
    metrics, _ = laffi_run
    best = max(metrics["test/exact"], metrics["test_reflect/exact"])
    assert best >= metrics["base/exact"] + 10.0
