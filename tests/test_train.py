"""Fine-tuning: loss only on target tokens, LoRA weights move while the base stays frozen."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM

from laffi_exp.stages.train_data import IGNORE_INDEX, Pair, PairDataModule, collate, encode_pair
from laffi_exp.stages.train_module import LoRAFineTuner


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["Context: a b c. Question: who? Answer: Bob Feedback: Correct."] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )


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
    module = LoRAFineTuner(
        model,
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"),
        lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    dm = PairDataModule(tokenizer, PAIRS, PAIRS[:2], batch_size=4, max_length=128, seed=0)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    lora = [n for n in before if "lora_" in n]
    assert lora and all(
        not torch.equal(before[n], dict(module.model.named_parameters())[n]) for n in lora if "lora_B" in n
    )
    frozen = [n for n in before if "lora_" not in n]
    after = dict(module.model.named_parameters())
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not after[n].requires_grad for n in frozen)


def test_too_long_examples_are_dropped_and_counted(tokenizer):
    dm = PairDataModule(
        tokenizer, PAIRS, PAIRS[:1], batch_size=2, max_length=len(encode_pair(tokenizer, PAIRS[3])[0]), seed=0
    )
    assert len(dm.train_set) == 4 and dm.train_set.dropped == 4
    with pytest.raises(ValueError, match="max_length"):
        PairDataModule(tokenizer, PAIRS, PAIRS, batch_size=2, max_length=3, seed=0)


def _tiny(arch: str, vocab: int):
    """A tiny causal LM of a family whose output head we run at target positions only."""
    torch.manual_seed(0)
    if arch == "llama":
        return tiny_llama(vocab)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # Soft-capping and a tied embedding: code after the head that the target-only loss must keep.
    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=128,
            sliding_window=8,
            final_logit_softcapping=5.0,
        )
    )


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_target_only_head_gives_the_full_logits_loss_and_gradients(tokenizer, arch):
    from laffi_exp.stages.train_module import head_at_targets_works, target_loss

    model = _tiny(arch, len(tokenizer))
    peft_model = LoRAFineTuner(
        model,
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"),
        torch.optim.AdamW,
    ).model
    for n, p in peft_model.named_parameters():  # LoRA B starts at zero: move it so every gradient path is live
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    batch = collate([encode_pair(tokenizer, p) for p in PAIRS[:4]], tokenizer.pad_token_id)
    assert head_at_targets_works(peft_model, batch)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    full = peft_model(**batch).loss
    full_grads = torch.autograd.grad(full, trainable)
    mine = target_loss(peft_model, batch)
    mine_grads = torch.autograd.grad(mine, trainable)
    assert torch.allclose(mine, full, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(mine_grads, full_grads))


def test_target_only_head_computes_logits_at_target_positions_only(tokenizer):
    from laffi_exp.models.head import output_head_at
    from laffi_exp.stages.train_module import target_positions

    model = tiny_llama(len(tokenizer))
    batch = collate([encode_pair(tokenizer, p) for p in PAIRS[:3]], tokenizer.pad_token_id)
    positions = target_positions(batch["labels"])
    with output_head_at(model, positions):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n_target = int((batch["labels"] != IGNORE_INDEX).sum())
    assert logits.shape == (n_target, len(tokenizer))  # not (batch, length, vocab)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(logits, full[positions], atol=1e-5)


def test_length_grouped_batches_cover_every_example_once_with_little_padding():
    from laffi_exp.stages.train_data import LengthGroupedSampler

    lengths = [int(x) for x in torch.randint(10, 400, (200,), generator=torch.Generator().manual_seed(1))]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(200)) and order == list(LengthGroupedSampler(lengths, 8, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(200))

    def padding(idx):
        batches = [idx[i : i + 8] for i in range(0, len(idx), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    shuffled = torch.randperm(200, generator=torch.Generator().manual_seed(3)).tolist()
    assert padding(order) < 0.2 * padding(shuffled)


def test_micro_batches_give_the_whole_batch_gradient_in_one_optimizer_step(tokenizer, tmp_path):
    """Training with micro_batch_tokens equals training on whole batches: the same adapter after 3 steps."""
    from laffi_exp.stages.train_module import micro_batches

    batch = collate([encode_pair(tokenizer, p) for p in PAIRS[:5]], tokenizer.pad_token_id)
    budget = int(batch["attention_mask"].sum(-1).max()) * 2
    parts = micro_batches(batch, max_tokens=budget)
    assert len(parts) == 3 and sum(len(p["input_ids"]) for p in parts) == 5
    assert all(p["input_ids"].numel() <= budget for p in parts)
    assert sum(int(p["attention_mask"].sum()) for p in parts) == int(
        batch["attention_mask"].sum()
    )  # only padding is cut

    def train(micro):
        pl.seed_everything(0)
        module = LoRAFineTuner(
            tiny_llama(len(tokenizer)),
            LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"),
            lambda params: torch.optim.AdamW(params, lr=1e-2),
            micro_batch_tokens=micro,
        )
        dm = PairDataModule(tokenizer, PAIRS, PAIRS[:2], batch_size=4, max_length=128, seed=0)
        trainer = pl.Trainer(
            max_steps=3,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            gradient_clip_val=1.0,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=dm)
        return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}

    first = collate([encode_pair(tokenizer, p) for p in PAIRS[:4]], tokenizer.pad_token_id)
    assert len(micro_batches(first, 40)) > 1  # the budget below splits every batch
    whole, micro = train(None), train(40)
    assert all(torch.allclose(whole[n], micro[n], rtol=1e-4, atol=1e-6) for n in whole)
