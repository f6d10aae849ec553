"""The README's main command on the embedded default, for real (slow: builds the base model once).

Checks the quality bar of the default: fine-tuning beats the untrained base by >= 10 EM points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["sft", "laffi"])
def test_default_run_beats_the_base(method, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "laffi_exp", f"method={method}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    best = max(metrics["test/exact"], metrics.get("test_reflect/exact", float("-inf")))
    print(f"{method}: base {metrics['base/exact']:.1f} direct {metrics['test/exact']:.1f} "
          f"reflect {metrics.get('test_reflect/exact', float('nan')):.1f} in {time.time() - start:.0f} s")
    assert best >= metrics["base/exact"] + 10.0
    for name in ("answers.jsonl", "predictions.json", "base_predictions.json", "adapter/adapter_model.safetensors"):
        if method == "sft" and name == "answers.jsonl":
            continue
        assert (tmp_path / "run" / name).is_file()
