"""Pretrained base models (model=hf and its presets), and the trainer presets: loading the shared tiny
Llama, every error by its message, offline hub behaviour, chat prompts, LoRA targets, memory options."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from laffi_exp.core.config import CONF_DIR, model_source, validate
from laffi_exp.core.errors import ConfigError
from laffi_exp.models import pretrained
from laffi_exp.models.base import BaseModel, wrap_chat
from laffi_exp.models.pretrained import PretrainedBase

from .conftest import TINYLLAMA, needs

LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem not in ("embedded", "hf"))
# The architecture of each preset's hub model, so its LoRA targets can be checked without a download.
PRESET_ARCHITECTURE = {
    "llama2_7b": "llama",
    "llama2_13b": "llama",
    "open_llama_3b": "llama",
    "smollm2_135m": "llama",
    "pythia_70m": "gpt_neox",
    "qwen2_5_0_5b": "qwen2",
    "gemma3_270m": "gemma3_text",
}
TRAINER_PRESETS = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml") if p.stem != "default")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def online_unreachable(monkeypatch):
    """Offline mode not asked for, and the hub does not answer (as on a machine without network)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "hub_reachable", lambda *a, **k: False)


def _hub_cache(root: Path, repo_id: str) -> Path:
    """A Hugging Face cache holding the shared tiny Llama under ``repo_id``, laid out as a download is."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        (snapshot / name).symlink_to(TINYLLAMA / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def _lora_modules(peft_model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


# -- loading the shared tiny Llama ------------------------------------------------------------------
@needs(TINYLLAMA)
def test_loads_local_folder_with_a_pad_token():
    base = PretrainedBase(str(TINYLLAMA)).load()
    assert isinstance(base, BaseModel)
    assert type(base.model).__name__ == "LlamaForCausalLM"
    assert base.path == str(TINYLLAMA) and base.name == str(TINYLLAMA)
    assert base.chat_template is False
    # No pad token on disk: EOS is reused (it is masked out of attention and loss anyway).
    assert base.tokenizer.pad_token == "</s>" and base.tokenizer.pad_token_id == 2
    assert base.model.generation_config.pad_token_id == 2
    assert next(base.model.parameters()).dtype == torch.float32
    batch = base.tokenizer(["Once upon a time", "Lily"], return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[0] == 2


@needs(TINYLLAMA)
@pytest.mark.parametrize(
    "dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.float32)]
)
def test_dtype(dtype, expected):
    model = PretrainedBase(str(TINYLLAMA), dtype=dtype).load().model
    assert {p.dtype for p in model.parameters()} == {expected}
    if dtype == "bfloat16":  # bf16 runs on CPU too
        logits = model(input_ids=torch.tensor([[1, 403, 407]])).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@needs(TINYLLAMA)
def test_pad_token_fallbacks_unk_then_a_new_token():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINYLLAMA, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(TINYLLAMA, local_files_only=True)
    tokenizer.eos_token = None
    PretrainedBase._set_pad_token(model, tokenizer)
    assert tokenizer.pad_token == "<unk>"
    tokenizer.pad_token = None
    tokenizer.unk_token = None
    PretrainedBase._set_pad_token(model, tokenizer)
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 512
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 513


# -- errors, each by its message --------------------------------------------------------------------
def test_unknown_dtype_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.dtype: expected one of float32, bfloat16, float16, auto, got 'fp8'"):
        PretrainedBase(str(TINYLLAMA), dtype="fp8").check()


@pytest.mark.parametrize("name", ["/no/such/model", "./no_such_model", "no/such/model/folder"])
def test_missing_folder(name):
    with pytest.raises(ConfigError, match="no such folder"):
        PretrainedBase(name).check()


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="is not a model folder .*config.json"):
        PretrainedBase(str(tmp_path)).check()
    with pytest.raises(ConfigError, match="is not a model folder"):
        PretrainedBase(str(tmp_path / "notes.txt")).check()


@needs(TINYLLAMA)
def test_folder_without_weights(tmp_path):
    shutil.copy(TINYLLAMA / "config.json", tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no weights"):
        PretrainedBase(str(tmp_path)).check()


TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 100,
}


@pytest.mark.parametrize(
    "config, message",
    [
        ({**TINY_BERT, "architectures": ["BertForMaskedLM"]}, r"BertForMaskedLM \(a bert model\), not a causal LM"),
        (TINY_BERT, r"an encoder model \(bert\), not a causal LM"),
        ({"model_type": "t5", "d_model": 16, "num_layers": 1, "num_heads": 2}, r"encoder-decoder model \(t5\)"),
        ({"model_type": "vit", "architectures": ["ViTModel"]}, "has no causal-LM class"),
        ({"model_type": "no-such-type"}, "cannot load .* as a causal LM"),
    ],
)
def test_not_a_causal_lm(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        PretrainedBase(str(tmp_path)).check()


def test_invalid_hub_id():
    with pytest.raises(ConfigError, match="neither an existing folder nor a valid hub id"):
        PretrainedBase("not a valid id!").check()


def test_hub_id_offline_fails_fast(offline, tmp_path):
    start = time.monotonic()
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache, and the hub is off .HF_HUB_OFFLINE"):
        PretrainedBase("EleutherAI/pythia-70m", cache_dir=str(tmp_path)).check()
    assert time.monotonic() - start < 5


def test_hub_id_unreachable_fails_fast(online_unreachable, tmp_path):
    with pytest.raises(ConfigError, match=r"the hub \(.*\) cannot be reached"):
        PretrainedBase("EleutherAI/pythia-70m", cache_dir=str(tmp_path)).check()


def test_hub_probe_is_one_quick_request(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    start = time.monotonic()
    assert pretrained.hub_reachable(timeout=2) is False
    assert time.monotonic() - start < 3


@needs(TINYLLAMA)
@pytest.mark.parametrize("mode", ["offline", "online_unreachable"])
def test_cached_hub_id_loads_without_the_hub(request, tmp_path, mode):
    request.getfixturevalue(mode)
    cache = _hub_cache(tmp_path / "hub", "someone/tiny-llama")
    start = time.monotonic()
    base = PretrainedBase("someone/tiny-llama", cache_dir=str(cache)).load()
    assert time.monotonic() - start < 15  # no hub retries (they take ~25 s)
    assert base.name == "someone/tiny-llama" and Path(base.path).parent.parent.name == "models--someone--tiny-llama"
    assert base.tokenizer.pad_token is not None


def test_4bit_without_cuda_or_bitsandbytes_is_a_config_error():
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("this machine can load 4-bit models")
    with pytest.raises(ConfigError, match=r"model\.load_in_4bit: 4-bit loading needs .*(bitsandbytes|CUDA GPU)"):
        PretrainedBase(str(TINYLLAMA), load_in_4bit=True).check()


# -- chat prompts -----------------------------------------------------------------------------------
@needs(TINYLLAMA)
def test_wrap_chat_single_user_turn_and_one_bos():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINYLLAMA, local_files_only=True)
    prompt = "Context: c\nQuestion: q\nAnswer:"
    assert wrap_chat(tokenizer, prompt) == prompt  # no template: unchanged
    tokenizer.chat_template = CHAT_TEMPLATE
    text = wrap_chat(tokenizer, prompt)
    assert text == f"<|user|>{prompt}<|end|><|assistant|>"  # the template's BOS is left to the tokenizer
    assert tokenizer(text)["input_ids"].count(tokenizer.bos_token_id) == 1
    base = BaseModel(model=None, tokenizer=tokenizer, name="x", path="x", chat_template=True)
    assert base.format_prompt(prompt) == text
    assert BaseModel(model=None, tokenizer=tokenizer, name="x", path="x").format_prompt(prompt) == prompt


@needs(TINYLLAMA)
def test_chat_template_flag_needs_a_template():
    assert PretrainedBase(str(TINYLLAMA), chat_template=True).load().chat_template is False


# -- memory options ---------------------------------------------------------------------------------
@needs(TINYLLAMA)
def test_gradient_checkpointing_trains_with_lora(make_cfg):
    from peft import get_peft_model

    base = PretrainedBase(str(TINYLLAMA), gradient_checkpointing=True).load()
    on = getattr(base.model, "is_activation_checkpointing", None)  # transformers 5.x; before: is_gradient_checkpointing
    assert (on if on is not None else base.model.is_gradient_checkpointing) and base.model.config.use_cache is False
    cfg = make_cfg("model=hf", f"model.name_or_path={TINYLLAMA}", embedded=False)
    model = get_peft_model(base.model, instantiate(cfg.method.lora, _convert_="all"))
    model.train()
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


# -- presets ----------------------------------------------------------------------------------------
def test_every_preset_has_a_known_architecture():
    assert set(PRESETS) == set(PRESET_ARCHITECTURE), "add new presets to PRESET_ARCHITECTURE"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_instantiates_without_loading(make_cfg, offline, tmp_path, preset):
    # weights_from=hub: the hub id alone (gemma3_270m would fall back to its installed offline package)
    cfg = make_cfg(f"model={preset}", f"model.cache_dir={tmp_path}", "model.weights_from=hub", embedded=False)
    validate(cfg)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert model["name"] == model["name_or_path"] and "/" in model["name_or_path"]
    assert model["dtype"] in pretrained.DTYPES and model["trust_remote_code"] is False
    assert model["load_in_4bit"] is False and model["gradient_checkpointing"] is False
    source = instantiate(model_source(cfg))
    assert isinstance(source, PretrainedBase) and source.name_or_path == model["name_or_path"]
    assert source.chat_template == model["chat_template"] == ("Instruct" in model["name_or_path"])
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):  # nothing cached here: fails before any download
        source.check()
    override = make_cfg(f"model={preset}", "model.name_or_path=/models/mine", "model.dtype=float16", embedded=False)
    assert override.model.name_or_path == "/models/mine" and override.model.dtype == "float16"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_lora_targets_match_the_architecture(make_cfg, preset):
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = make_cfg(f"model={preset}", embedded=False)
    lora = instantiate(cfg.method.lora, _convert_="all")
    architecture = PRESET_ARCHITECTURE[preset]
    if architecture == "llama":
        if not TINYLLAMA.exists():
            pytest.skip(f"{TINYLLAMA} is absent (the shared/ folder beside the project)")
        model = PretrainedBase(str(TINYLLAMA)).load().model
    else:  # a tiny random model of the preset's architecture: same module names, no download
        config = AutoConfig.for_model(
            architecture,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=128,
            **({"head_dim": 16} if architecture == "gemma3_text" else {}),
        )
        model = AutoModelForCausalLM.from_config(config)
    assert _lora_modules(get_peft_model(model, lora)) == set(cfg.model.target_modules)


@needs(TINYLLAMA)
def test_hf_default_all_linear_targets_every_llama_projection(make_cfg):
    from peft import get_peft_model

    cfg = make_cfg("model=hf", f"model.name_or_path={TINYLLAMA}", embedded=False)
    assert cfg.model.target_modules == "all-linear"
    base = instantiate(model_source(cfg)).load()
    assert _lora_modules(get_peft_model(base.model, instantiate(cfg.method.lora, _convert_="all"))) == LLAMA_MODULES


@pytest.mark.parametrize("preset", TRAINER_PRESETS)
def test_trainer_preset_composes(make_cfg, preset):
    trainer = make_cfg(f"trainer={preset}").trainer
    assert trainer.max_steps == 4  # the default's keys (and overrides) still apply
    expected = {
        "gpu": {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"},
        "ddp": {"accelerator": "gpu", "num_nodes": 1, "strategy": "DDPStrategy"},
        "fsdp": {"accelerator": "gpu", "num_nodes": 1, "strategy": "FSDPStrategy"},
        "ddp_cpu": {"accelerator": "cpu", "devices": 2, "strategy": "DDPStrategy", "precision": "32-true"},
        "fsdp_cpu": {"accelerator": "cpu", "devices": 2, "strategy": "CPUFSDPStrategy", "precision": "32-true"},
    }[preset]
    for key, value in expected.items():
        got = trainer[key]._target_.rsplit(".", 1)[-1] if key == "strategy" else trainer[key]
        assert got == value, key
    if "strategy" in trainer:
        instantiate(trainer.strategy)  # the strategy object builds without a GPU


def test_ddp_devices_and_nodes_are_configurable(make_cfg):
    trainer = make_cfg("trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2").trainer
    assert (trainer.devices, trainer.num_nodes) == (4, 2)


def test_ddp_cpu_trainer_instantiates(make_cfg, tmp_path):
    trainer = instantiate(make_cfg("trainer=ddp_cpu").trainer, logger=False, default_root_dir=str(tmp_path))
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.num_devices == 2
    assert trainer.strategy.process_group_backend == "gloo"


@pytest.mark.slow
@needs(TINYLLAMA)
def test_ddp_cpu_fits_lora_on_two_processes(make_cfg, tmp_path):
    from laffi_exp.stages.train_data import Pair, PairDataModule
    from laffi_exp.stages.train_module import LoRAFineTuner

    # The preset expects torchrun to start the ranks (tests/test_distributed.py); here Lightning spawns
    # them, so that the trained weights come back to this process.
    cfg = make_cfg(
        "trainer=ddp_cpu",
        "+trainer.strategy.start_method=spawn",
        "trainer.max_steps=2",
        "model=hf",
        f"model.name_or_path={TINYLLAMA}",
        embedded=False,
    )
    base = instantiate(model_source(cfg)).load()
    pairs = [Pair(str(i), f"Once upon a time {i}", " there was a cat.") for i in range(16)]
    data = PairDataModule(base.tokenizer, pairs, pairs[:4], batch_size=4, max_length=64, seed=0)
    module = LoRAFineTuner(base.model, instantiate(cfg.method.lora, _convert_="all"), instantiate(cfg.method.optimizer))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer = instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    # spawn: the trained weights come back to this process
    assert all(not torch.equal(before[n], p) for n, p in module.model.named_parameters() if p.requires_grad)


@pytest.mark.gpu
@needs(TINYLLAMA)
def test_4bit_qlora_on_gpu():
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs a CUDA GPU and bitsandbytes")
    from peft import LoraConfig, get_peft_model

    base = PretrainedBase(str(TINYLLAMA), load_in_4bit=True, gradient_checkpointing=True).load()
    assert base.model.is_loaded_in_4bit and base.model.config.use_cache is False
    model = get_peft_model(base.model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=sorted(LLAMA_MODULES)))
    model.train()
    ids = torch.tensor([[1, 403, 407, 261, 378]], device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
