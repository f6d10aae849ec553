"""The embedded base's feedback writer (``model.feedback_writer``): it comes from the config, since
models sit below feedback; it writes the warm-up corpus's feedback texts only, is not part of the weights'
key, is not needed to load a build, and building without one is a one-line config error."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from laffi_exp.core.config import CONF_DIR, model_source
from laffi_exp.core.errors import ConfigError
from laffi_exp.models.embedded import SHIPPED_DIR, EmbeddedBase


def _source_cfg(tmp_path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.cache_dir={tmp_path / 'cache'}", *overrides])
    return model_source(cfg)


def _without_writer(tmp_path, *overrides: str) -> EmbeddedBase:
    kwargs = _source_cfg(tmp_path, *overrides)
    kwargs.pop("_target_"), kwargs.pop("feedback_writer")
    return EmbeddedBase(**kwargs)


def test_the_writer_is_configured_and_not_in_the_weights_key(tmp_path):
    source_cfg = _source_cfg(tmp_path)
    assert source_cfg["feedback_writer"] == {
        "_target_": "laffi_exp.feedback.simulated.SimulatedHuman",
        "_partial_": True,
    }
    source = instantiate(source_cfg)
    annotator = source.feedback_writer(source.seed)
    assert type(annotator).__name__ == "SimulatedHuman" and annotator.seed == source.seed
    bare = _without_writer(tmp_path)
    assert bare.spec() == source.spec() and bare.key() == source.key()
    assert "feedback_writer" not in source.spec()


def test_the_shipped_build_loads_without_a_writer(tmp_path):
    base = _without_writer(tmp_path).load()
    assert base.path == str(SHIPPED_DIR) and not (tmp_path / "cache").exists()


def test_building_without_a_writer_is_one_config_error(tmp_path):
    source = _without_writer(tmp_path, "model.warmup_steps=10")  # not the shipped build
    for attempt in (source.load, source.build):
        with pytest.raises(ConfigError) as err:
            attempt()
        message = str(err.value)
        assert message.startswith("model.feedback_writer:") and "\n" not in message
    assert not (tmp_path / "cache").exists()  # refused before anything is written


def test_models_do_not_import_feedback():
    code = (
        "import sys, laffi_exp.models.embedded; "
        "print(sorted(m for m in sys.modules if m.startswith('laffi_exp.feedback')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
