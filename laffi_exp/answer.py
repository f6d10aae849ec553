"""Stage 1, answer prediction: the model answers questions by batched greedy generation
(left padding, KV cache), and each generation is post-processed into a SQuAD answer."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from laffi_exp.models.head import output_head_at
from laffi_exp.prompts import Prompter
from laffi_exp.records import Answer, QAExample


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    max_prompt_tokens: int | None = None,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts``, in order. Prompts are sorted by length into batches so
    that padding stays small; stops at EOS or at the end of the first line."""
    was_training = model.training
    model.eval()
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    newline_ids = _newline_ids(tokenizer)
    try:
        for idx in tqdm(batches(prompts, batch_size), desc=desc, leave=False, mininterval=2):
            enc = tokenizer(
                [prompts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=max_prompt_tokens is not None,
                max_length=max_prompt_tokens,
            ).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=[tokenizer.eos_token_id, *newline_ids] if newline_ids else tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                out[i] = text
    finally:
        tokenizer.padding_side = pad_side
        model.train(was_training)
    return out


@torch.inference_mode()
def sequence_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 32,
) -> list[float]:
    """Sum of the log-probabilities of the tokens of ``continuations[i]`` given ``prompts[i]``
    (teacher forcing), in input order.

    Tokenized as training does (``laffi_exp.train.encode_pair``, without the EOS): the prompt with
    special tokens, the continuation without, concatenated. Consecutive chunks of ``batch_size``
    pairs, right-padded with an attention mask; log-softmax in float32 (or wider). Raises ValueError
    when the two lists differ in length or a prompt or continuation has no tokens.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations: lengths must match")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not prompts:
        return []
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    cont_ids = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    for i, (p_ids, c_ids) in enumerate(zip(prompt_ids, cont_ids)):
        if not c_ids:
            raise ValueError(f"continuation {i} ({continuations[i]!r}) tokenizes to zero tokens")
        if not p_ids:
            # Nothing to condition the first continuation token on.
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenizes to zero tokens")

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: list[float] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="logprobs", leave=False, mininterval=2):
            rows = [p + c for p, c in zip(prompt_ids[start : start + batch_size], cont_ids[start : start + batch_size])]
            n_prompt = [len(p) for p in prompt_ids[start : start + batch_size]]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            # scored[b, t]: the token at t + 1 is a continuation token, predicted by the logits at t.
            scored = torch.zeros((len(rows), width), dtype=torch.bool)
            for b, (r, n) in enumerate(zip(rows, n_prompt)):
                input_ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
                attention_mask[b, : len(r)] = 1
                scored[b, n - 1 : len(r) - 1] = True
            input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)
            targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=pad_id)[scored]
            # The head only at the scored positions: (n continuation tokens, vocab), not (batch, width, vocab).
            with output_head_at(model, scored):
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            token_lp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            row = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(scored)[scored]
            out.extend(torch.zeros(len(rows), dtype=token_lp.dtype, device=device).index_add_(0, row, token_lp).tolist())
    finally:
        model.train(was_training)
    return out


def batches(prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    """The indices of ``prompts`` in the batches that ``generate`` forms: sorted by length (stable),
    then cut every ``batch_size``."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _newline_ids(tokenizer) -> list[int]:
    """Token ids that are exactly a newline, used as extra stop tokens (answers are one line)."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return ids if len(ids) == 1 else []


def predict_answers(
    model,
    tokenizer,
    examples: Sequence[QAExample],
    prompter: Prompter,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    max_prompt_tokens: int | None = None,
    desc: str = "answer",
    generate_fn: Callable[[list[str], int], list[str]] | None = None,
) -> list[Answer]:
    """Answer every example; ``prediction`` is the SQuAD answer ("" = no answer), ``generation`` the raw text.
    ``generate_fn(prompts, max_new_tokens)`` replaces ``generate`` (the pipeline passes a cached one)."""
    prompts = [prompter.answer_prompt(ex) for ex in examples]
    if generate_fn is not None:
        generations = generate_fn(prompts, max_new_tokens)
    else:
        generations = generate(model, tokenizer, prompts, max_new_tokens, batch_size, max_prompt_tokens, desc)
    return [
        Answer(id=ex.id, question=ex.question, prediction=prompter.to_answer(g), generation=g)
        for ex, g in zip(examples, generations)
    ]


def as_predictions(answers: Sequence[Answer]) -> dict[str, str]:
    """The official SQuAD predictions format: question id → answer text."""
    return {a.id: a.prediction for a in answers}


