"""The real path on real files: SQuAD 2.0 dev questions and the pretrained tinyllamas checkpoint
(loading, LoRA on real modules, long-context windowing, generation, scoring) for a few steps on CPU."""

from __future__ import annotations

import json

import pytest

from laffi_exp.pipeline import run
from laffi_exp.scoring.squad_metrics import evaluate

from .conftest import SQUAD_DEV, TINYLLAMA, needs

pytestmark = [pytest.mark.slow, needs(SQUAD_DEV), needs(TINYLLAMA)]


@pytest.mark.parametrize("method", ["laffi", "sft"])
def test_squad_v2_with_tinyllamas(method, make_cfg, tmp_path):
    cfg = make_cfg(
        f"method={method}",
        "dataset=squad_v2",
        f"dataset.path={SQUAD_DEV.parent}",
        "dataset.num_train=32",
        "dataset.num_val=8",
        "dataset.num_eval=24",
        "model=hf",
        f"model.name_or_path={TINYLLAMA}",
        "model.max_length=512",
        "trainer.max_steps=3",
        embedded=False,
    )
    metrics = run(cfg)
    out = tmp_path / "run"
    assert metrics["test/total"] == 24 and metrics["base/total"] == 24
    # 34% of dev contexts exceed the 512-token window on their own: some must have been shortened
    assert metrics["data/shortened_test"] > 0 and metrics["data/shortened_train"] > 0
    chosen = json.loads((out / "chosen_ids.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    assert set(preds) == set(chosen["test"])
    data = json.loads((out / "eval_data.json").read_text())["data"]
    assert evaluate(data, preds)["exact"] == pytest.approx(metrics["test/exact"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    if method == "laffi":
        assert len((out / "feedback.jsonl").read_text().splitlines()) == 32
