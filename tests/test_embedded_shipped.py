"""The embedded base model the package ships: it is the build of the default config (so a first run
starts at once), checked by sha256 on load, with a damaged copy rebuilt rather than used; and (slow) a
build from scratch answers the test questions as the shipped one does."""

from __future__ import annotations

import json
import shutil

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from laffi_exp.core.config import CONF_DIR, model_source
from laffi_exp.models.embedded import SHIPPED_DIR


def _default_source(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.cache_dir={tmp_path / 'cache'}", *overrides])
    return cfg, instantiate(model_source(cfg))


def test_the_package_ships_the_default_configs_build(tmp_path):
    _, source = _default_source(tmp_path)
    listing = json.loads((SHIPPED_DIR / "SHIPPED.json").read_text())
    assert listing["key"] == source.key()  # conf/model/embedded.yaml and the shipped build agree
    assert json.loads((SHIPPED_DIR / "build_info.json").read_text())["spec"] == source.spec()
    assert source.shipped() == SHIPPED_DIR
    base = source.load()  # from the package: nothing is built, nothing written to the cache
    assert base.path == str(SHIPPED_DIR) and not (tmp_path / "cache").exists()
    assert base.fingerprint["weights_sha256"] == listing["files"]["model.safetensors"]


def test_a_damaged_shipped_file_is_not_used(tmp_path, caplog):
    copy = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    _, source = _default_source(tmp_path)
    assert source.shipped(copy) is None
    assert "fails its checksum" in caplog.text


def test_another_config_is_not_the_shipped_build(tmp_path):
    _, source = _default_source(tmp_path, "model.warmup_steps=10")
    assert source.shipped() is None  # built and cached as before


@pytest.mark.slow
def test_a_rebuild_answers_like_the_shipped_model(tmp_path):
    """Rebuilt from scratch on this machine, the base answers the default run's test questions as the
    shipped one does: bit-identical weights are expected on the same CPU type and torch build; elsewhere
    the EM of the two on the 600 test questions must agree within 3 points."""
    from laffi_exp.core.prompts import Prompter
    from laffi_exp.data.squad_format import examples_from_squad
    from laffi_exp.stages import evaluate
    from laffi_exp.stages.answer import as_predictions, predict_answers

    cfg, source = _default_source(tmp_path)
    shipped, rebuilt = source.load(), source.load(build=True)
    assert rebuilt.path != shipped.path and (tmp_path / "cache").is_dir()
    test = examples_from_squad(instantiate(cfg.dataset).splits()["test"], source="test")
    scores = {}
    for name, base in (("shipped", shipped), ("rebuilt", rebuilt)):
        answers = predict_answers(base.model, base.tokenizer, test, Prompter(), cfg.generation.max_new_tokens, 64)
        scores[name] = evaluate.score(test, as_predictions(answers), name)[f"{name}/exact"]
    same = shipped.fingerprint["weights_sha256"] == rebuilt.fingerprint["weights_sha256"]
    print(f"shipped EM {scores['shipped']:.1f}, rebuilt EM {scores['rebuilt']:.1f}, bit-identical weights: {same}")
    assert abs(scores["shipped"] - scores["rebuilt"]) <= 3.0
