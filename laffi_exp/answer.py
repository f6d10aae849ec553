"""Stage 1, answer prediction: the model answers questions by batched greedy generation
(left padding, KV cache), and each generation is post-processed into a SQuAD answer."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

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


