"""Stage 1: batched greedy generation with left padding gives what one-by-one generation gives."""

from __future__ import annotations

import torch

from laffi_exp.answer import generate, predict_answers
from laffi_exp.prompts import Prompter
from laffi_exp.records import QAExample

from .test_train import tiny_llama, tokenizer  # noqa: F401  (fixture)


def test_batched_generation_equals_one_by_one(tokenizer):  # noqa: F811
    model = tiny_llama(len(tokenizer)).double()
    prompts = ["Context: a b c. Question: who?", "Context: a.", "Context: a b c d d d d d d. Question: who? Answer:"]
    tokenizer.padding_side = "right"  # generate must switch to left padding itself
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right"
    assert any(text for text in batched)


def test_predict_answers_keeps_order_and_raw_text(tokenizer):  # noqa: F811
    model = tiny_llama(len(tokenizer))
    exs = [QAExample(id=f"q{i}", title="t", context="a b " * i, question="who?", answers=()) for i in range(5)]
    answers = predict_answers(model, tokenizer, exs, Prompter(), max_new_tokens=4, batch_size=2)
    assert [a.id for a in answers] == [e.id for e in exs]
    for a in answers:
        assert a.prediction == Prompter().to_answer(a.generation)
