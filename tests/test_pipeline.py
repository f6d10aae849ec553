"""A short end-to-end run: every stage on tiny inputs, every artifact on disk, deterministic."""

from __future__ import annotations

import json

import pytest
import yaml

from laffi_exp.core.io import read_jsonl
from laffi_exp.pipeline import run
from laffi_exp.scoring.squad_metrics import evaluate

from .conftest import ARTIFACTS

SQUAD_KEYS = ["exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "total"]


@pytest.fixture(scope="module")
def laffi_run(tmp_path_factory, cache_dir):
    from hydra import compose, initialize_config_dir

    from laffi_exp.core.config import CONF_DIR

    from .conftest import TINY

    out = tmp_path_factory.mktemp("laffi")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[*TINY, f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}", "feedback.human_ratio=0.5"],
        )
    return cfg, run(cfg), out


def test_laffi_run_writes_every_artifact(laffi_run):
    cfg, metrics, out = laffi_run
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    for prefix in ("test", "base", "test_reflect"):
        for key in SQUAD_KEYS:
            assert isinstance(metrics[f"{prefix}/{key}"], (int, float)), f"{prefix}/{key}"
    assert metrics["test/total"] == cfg.dataset.num_eval
    assert yaml.safe_load((out / "adapter" / "config.yaml").read_text())["feedback"]["human_ratio"] == 0.5


def test_feedback_records_have_the_documented_fields(laffi_run):
    cfg, metrics, out = laffi_run
    rows = list(read_jsonl(out / "feedback.jsonl"))
    assert len(rows) == cfg.dataset.num_train
    for row in rows:
        assert {"id", "question", "prediction", "feedback", "source", "annotator"} <= set(row)
        assert row["source"] in ("human", "synthetic")
        assert row["annotator"] == ("simulated_human" if row["source"] == "human" else "rule_based")
    share = sum(r["source"] == "human" for r in rows) / len(rows)
    assert metrics["feedback/human_share"] == pytest.approx(share)
    answers = {r["id"]: r["prediction"] for r in read_jsonl(out / "answers.jsonl")}
    assert all(answers[r["id"]] == r["prediction"] for r in rows)


def test_predictions_are_official_format_and_rescore_to_the_metrics(laffi_run):
    _cfg, metrics, out = laffi_run
    data = json.loads((out / "eval_data.json").read_text())["data"]
    for file, prefix in (
        ("predictions.json", "test"),
        ("base_predictions.json", "base"),
        ("reflect_predictions.json", "test_reflect"),
    ):
        preds = json.loads((out / file).read_text())
        assert all(isinstance(v, str) for v in preds.values())
        rescored = evaluate(data, preds)
        assert rescored["exact"] == pytest.approx(metrics[f"{prefix}/exact"])
        assert rescored["f1"] == pytest.approx(metrics[f"{prefix}/f1"])


def test_no_answer_probabilities_give_the_official_best_thresholds(laffi_run, tmp_path):
    from laffi_exp import score

    _cfg, metrics, out = laffi_run
    for preds_file, na_file, prefix in (
        ("predictions.json", "na_probs.json", "test"),
        ("base_predictions.json", "base_na_probs.json", "base"),
    ):
        preds, na_probs = (json.loads((out / f).read_text()) for f in (preds_file, na_file))
        assert na_probs.keys() == preds.keys()
        assert all(0.0 <= p <= 1.0 for p in na_probs.values())
        assert all(na_probs[qid] == 1.0 for qid, pred in preds.items() if pred == "")  # already said "no answer"
        assert len(set(na_probs.values())) > 2  # a real probability, not a copy of the predictions
        # The files in the run dir give the official script's numbers, which are the run's metrics.
        result = tmp_path / f"{prefix}.json"
        assert (
            score.main(
                [
                    str(out / "eval_data.json"),
                    str(out / preds_file),
                    "--na-prob-file",
                    str(out / na_file),
                    "--out-file",
                    str(result),
                ]
            )
            == 0
        )
        official = json.loads(result.read_text())
        for key in ("exact", "f1", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"):
            assert metrics[f"{prefix}/{key}"] == pytest.approx(official[key]), f"{prefix}/{key}"
        assert metrics[f"{prefix}/best_f1"] >= metrics[f"{prefix}/f1"]  # the threshold 1.0 is among those tried
    assert "test_reflect/best_f1" not in metrics  # for the direct protocol's answers


@pytest.mark.parametrize("cached", [False, True], ids=["computed-again", "from-stage-cache"])
def test_same_seed_same_results(laffi_run, tmp_path, cached):
    cfg, metrics, out = laffi_run
    from omegaconf import open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "again")
        cfg.cache.enabled = cached
    again = run(cfg)
    drop = {"time/seconds"}
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in metrics.items() if k not in drop}
    for name in ("predictions.json", "reflect_predictions.json", "feedback.jsonl", "answers.jsonl"):
        assert (tmp_path / "again" / name).read_text() == (out / name).read_text(), name


def test_sft_run_trains_on_gold_answers(make_cfg, tmp_path):
    metrics = run(make_cfg("method=sft", "evaluation.na_probs=false"))
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "test/exact" in metrics and "base/exact" in metrics
    assert not (out / "na_probs.json").exists() and not any("best_" in k for k in metrics)  # switched off
    assert not any(k.startswith("test_reflect/") for k in metrics)
    assert not (out / "feedback.jsonl").exists()  # SFT never looks at feedback


@pytest.mark.slow
def test_a_run_that_builds_the_base_matches_one_that_loads_it(make_cfg, tmp_path):
    fresh = tmp_path / "fresh_cache"
    first = run(
        make_cfg(f"paths.cache_dir={fresh}", f"paths.output_dir={tmp_path / 'a'}", "cache.enabled=false")
    )  # builds
    second = run(
        make_cfg(f"paths.cache_dir={fresh}", f"paths.output_dir={tmp_path / 'b'}", "cache.enabled=false")
    )  # loads
    drop = {"time/seconds"}
    assert {k: v for k, v in first.items() if k not in drop} == {k: v for k, v in second.items() if k not in drop}
    assert (tmp_path / "a" / "feedback.jsonl").read_text() == (tmp_path / "b" / "feedback.jsonl").read_text()


def test_the_adapter_does_not_depend_on_random_draws_before_training(make_cfg, tmp_path, monkeypatch):
    """The trained-adapter cache key holds the seed, not the RNG's history: whatever stages 1 and 2 draw
    (an annotator model loaded on a cache miss, say) must not change the LoRA initialisation."""
    import random

    import numpy as np
    import torch

    from laffi_exp.stages import annotate as annotate_stage

    run(make_cfg(f"paths.output_dir={tmp_path / 'a'}", "cache.enabled=false"))
    annotate = annotate_stage.annotate

    def drawing(*args, **kwargs):
        torch.rand(1000), random.random(), np.random.rand()
        return annotate(*args, **kwargs)

    monkeypatch.setattr(annotate_stage, "annotate", drawing)
    run(make_cfg(f"paths.output_dir={tmp_path / 'b'}", "cache.enabled=false"))
    a, b = ((tmp_path / d / "adapter" / "adapter_model.safetensors").read_bytes() for d in "ab")
    assert a == b
