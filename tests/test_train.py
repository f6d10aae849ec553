"""Fine-tuning: loss only on target tokens, LoRA weights move while the base stays frozen."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM

from laffi_exp.train import IGNORE_INDEX, LoRAFineTuner, Pair, PairDataModule, collate, encode_pair


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["Context: a b c. Question: who? Answer: Bob Feedback: Correct."] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))


PAIRS = [Pair(f"p{i}", f"Context: a b c {'d ' * i}. Question: who?", " Bob Feedback: Correct.") for i in range(8)]


def test_labels_mask_the_prompt_and_padding(tokenizer):
    ids, labels = encode_pair(tokenizer, PAIRS[0])
    n_prompt = len(tokenizer(PAIRS[0].prompt)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    batch = collate([encode_pair(tokenizer, PAIRS[0]), encode_pair(tokenizer, PAIRS[5])], tokenizer.pad_token_id)
    short = len(encode_pair(tokenizer, PAIRS[0])[0])
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, short:] == 0).all()


def test_loss_ignores_prompt_and_padding_tokens(tokenizer):
    model = tiny_llama(len(tokenizer))
    batch = collate([encode_pair(tokenizer, p) for p in PAIRS[:3]], tokenizer.pad_token_id)
    loss = model(**batch).loss
    # the same loss by hand, over target tokens only
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, manual, atol=1e-5)
    # the loss counts exactly the target tokens and EOS of each pair
    n_target = int(keep.sum())
    assert n_target == sum(len(tokenizer(p.target, add_special_tokens=False)["input_ids"]) + 1 for p in PAIRS[:3])


def test_lora_parameters_change_and_base_weights_stay_frozen(tokenizer, tmp_path):
    pl.seed_everything(0)
    model = tiny_llama(len(tokenizer))
    module = LoRAFineTuner(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"),
                           lambda params: torch.optim.AdamW(params, lr=1e-2))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    dm = PairDataModule(tokenizer, PAIRS, PAIRS[:2], batch_size=4, max_length=128, seed=0)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    lora = [n for n in before if "lora_" in n]
    assert lora and all(not torch.equal(before[n], dict(module.model.named_parameters())[n]) for n in lora if "lora_B" in n)
    frozen = [n for n in before if "lora_" not in n]
    after = dict(module.model.named_parameters())
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not after[n].requires_grad for n in frozen)


def test_too_long_examples_are_dropped_and_counted(tokenizer):
    dm = PairDataModule(tokenizer, PAIRS, PAIRS[:1], batch_size=2, max_length=len(encode_pair(tokenizer, PAIRS[3])[0]), seed=0)
    assert len(dm.train_set) == 4 and dm.train_set.dropped == 4
    with pytest.raises(ValueError, match="max_length"):
        PairDataModule(tokenizer, PAIRS, PAIRS, batch_size=2, max_length=3, seed=0)
