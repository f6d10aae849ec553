"""Every config group option composes and instantiates; bad values fail early with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from laffi_exp.core.config import CONF_DIR, model_source, validate
from laffi_exp.core.errors import ConfigError

from .conftest import SQUAD_DEV, TINYLLAMA

GROUPS = ["dataset", "model", "feedback", "method", "trainer", "logger", "paths"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
REQUIRED = {"model=hf": f"model.name_or_path={TINYLLAMA}", "dataset=squad_json": f"dataset.path={SQUAD_DEV}"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_instantiates(group, option, make_cfg, tmp_path):
    choice = f"{group}={option}"
    extra = [REQUIRED[choice]] if choice in REQUIRED else []
    cfg = make_cfg(choice, *extra, embedded=group != "model" or option == "embedded")
    validate(cfg)
    instantiate(cfg.dataset).sizes
    instantiate(model_source(cfg))
    instantiate(cfg.feedback.human), instantiate(cfg.feedback.synthetic)
    lora = instantiate(cfg.method.lora, _convert_="all")
    assert lora.r > 0
    assert callable(instantiate(cfg.method.optimizer))
    for node in cfg.get("logger", {}).values():
        assert node._target_.startswith("pytorch_lightning.loggers.")


def test_required_keys_exist_and_experiment_is_not_a_default(make_cfg):
    cfg = make_cfg()
    for key in ("seed", "dataset.num_train", "dataset.num_eval", "feedback.human_ratio"):
        assert cfg_select(cfg, key) is not None, key
    from omegaconf import OmegaConf

    defaults = OmegaConf.load(CONF_DIR / "config.yaml").defaults
    assert not any("experiment" in str(entry) for entry in defaults)  # so that +experiment=NAME works
    assert (CONF_DIR / "experiment").is_dir()


def cfg_select(cfg, key):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("feedback.human_ratio=1.5", "feedback.human_ratio"),
        ("feedback.human_ratio=-0.1", "feedback.human_ratio"),
        ("dataset.num_train=0", "dataset.num_train"),
        ("method.batch_size=0", "method.batch_size"),
        ("seed=-1", "seed"),
        ("evaluation.protocols=[direct,guess]", "evaluation.protocols"),
        ("generation.batch_size=0", "generation.batch_size"),
        ("generation.feedback_max_new_tokens=0", "generation.feedback_max_new_tokens"),
        ("dataset.num_val=0", "dataset.num_val"),
        ("method.lora.r=0", "method.lora.r"),
        ("method.lora.lora_dropout=1.5", "method.lora.lora_dropout"),
        ("method.optimizer.lr=-1", "method.optimizer"),
        ("+method.optimizer.no_such_arg=1", "method.optimizer"),
        ("prompt.answer_template='Q: {question} {nope}'", "prompt.answer_template: unknown field {nope}"),
        ("prompt.feedback_template='{context} {prediction'", "prompt.feedback_template: not a format string"),
        ("cache.checkpoint_every=-5", "cache.checkpoint_every"),
        ("cache.chunk_batches=two", "cache.chunk_batches"),
    ],
)
def test_bad_values_name_the_key(make_cfg, override, needle):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(override))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_an_unwritable_cache_dir_is_refused_before_any_work(make_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"paths\.cache_dir: cannot write to"):
        validate(make_cfg(f"paths.cache_dir={blocker / 'cache'}"))


def test_missing_required_value_names_the_key(make_cfg):
    with pytest.raises(ConfigError, match=r"model\.name_or_path"):
        validate(make_cfg("model=hf", embedded=False))


def test_conf_ships_inside_the_package():
    import laffi_exp

    assert Path(laffi_exp.__file__).parent / "conf" == CONF_DIR
    assert Path(CONF_DIR, "config.yaml").is_file()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["paths.output_dir=/tmp/x"])
    assert cfg.method.name == "laffi" and cfg.model.name == "embedded-llama"
