"""Stage 1: batched greedy generation with left padding gives what one-by-one generation gives."""

from __future__ import annotations

import torch

from laffi_exp.core.prompts import Prompter
from laffi_exp.core.records import QAExample
from laffi_exp.models.generation import generate
from laffi_exp.stages.answer import predict_answers

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


def _passages(n_passages: int = 3, per: int = 4) -> list[QAExample]:
    return [
        QAExample(
            id=f"q{p}_{k}",
            title="t",
            context=f"Context {p}: " + "a b c d " * (6 + 2 * p),
            question="who " * (k + 1) + "?",
            answers=(),
        )
        for p in range(n_passages)
        for k in range(per)
    ]


def test_a_shared_passage_is_read_once_and_changes_no_output(tokenizer):  # noqa: F811
    """Questions on one passage: the prefix they share is computed once per batch, and greedy outputs and
    likelihoods are those of generating every prompt alone (float64, so no rounding decides a token)."""
    from laffi_exp.models import shared_prefix
    from laffi_exp.models.generation import sequence_logprobs

    model = tiny_llama(len(tokenizer)).double()
    exs = _passages()
    prompts = [Prompter().answer_prompt(ex) for ex in exs]
    groups = [ex.context for ex in exs]
    ids = tokenizer(prompts)["input_ids"]
    shared = shared_prefix.shared_lengths(ids, groups)
    assert all(s >= shared_prefix.MIN_SHARED for s in shared)
    assert all(
        ids[i][: shared[i]] == ids[j][: shared[j]]
        for i in range(len(ids))
        for j in range(len(ids))
        if groups[i] == groups[j]
    )

    forwards = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw["input_ids"].shape), with_kwargs=True)
    with_sharing = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=5, groups=groups)
    handle.remove()
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert with_sharing == alone and any(alone)
    # the prefix pass of a batch holds one row per distinct passage, not one per prompt
    assert any(shape[0] < 5 and shape[1] >= shared_prefix.MIN_SHARED for shape in forwards)

    continuations = [" a b", " unanswerable", " c"] * 4
    lp_shared = sequence_logprobs(model, tokenizer, prompts, continuations, batch_size=5, groups=groups)
    lp_alone = [sequence_logprobs(model, tokenizer, [p], [c], batch_size=1)[0] for p, c in zip(prompts, continuations)]
    assert torch.allclose(torch.tensor(lp_shared), torch.tensor(lp_alone), atol=1e-9)
