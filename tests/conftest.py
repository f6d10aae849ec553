"""Shared fixtures: tiny configs composed from laffi_exp/conf/, a per-session cache for the tiny base model,
and the paths of the shared data beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from laffi_exp.core.config import CONF_DIR

SHARED = Path(__file__).resolve().parents[2] / "shared"
SQUAD_DEV = SHARED / "data" / "squad_v2" / "dev-v2.0.json"
TINYLLAMA = SHARED / "models" / "tinyllamas-stories260K"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A model and data small enough for a CPU test in seconds; every key is a real config key.
TINY_MODEL = [
    "model.architecture.hidden_size=32",
    "model.architecture.intermediate_size=64",
    "model.architecture.num_hidden_layers=1",
    "model.architecture.num_attention_heads=2",
    "model.architecture.num_key_value_heads=2",
    "model.vocab_size=400",
    "model.warmup_questions=200",
    "model.warmup_steps=10",
    "model.max_length=384",
]
TINY = [
    *TINY_MODEL,
    "dataset.num_train=24",
    "dataset.num_val=8",
    "dataset.num_eval=16",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "method.batch_size=4",
    "generation.max_new_tokens=6",
    "generation.feedback_max_new_tokens=12",
    "logger=csv",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache per test session, so the tiny base model is built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """Compose the real config with the tiny overrides (plus any given), writing under tmp_path."""

    def _make(*overrides: str, embedded: bool = True) -> DictConfig:
        tiny = TINY if embedded else [o for o in TINY if o not in TINY_MODEL]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[
                    *tiny,
                    f"paths.cache_dir={cache_dir}",
                    f"paths.output_dir={tmp_path / 'run'}",
                    f"cache.dir={tmp_path / 'stages'}",
                    *overrides,
                ],
            )

    return _make


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (the shared/ folder beside the project)")


# Every artifact a laffi run writes (the pipeline, distributed and default-run tests check them).
ARTIFACTS = [
    "config.yaml",
    "answers.jsonl",
    "feedback.jsonl",
    "predictions.json",
    "base_predictions.json",
    "reflect_predictions.json",
    "metrics.json",
    "eval_data.json",
    "adapter/adapter_model.safetensors",
    "adapter/adapter_config.json",
    "adapter/config.yaml",
    "csv/metrics.csv",
]
