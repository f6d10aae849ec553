"""Long contexts: when a passage does not fit the model's window, shorten it deliberately.

Training examples keep a window of the passage around the first gold answer (so the target stays
supported by the text); evaluation examples keep the head of the passage (the gold answer is never
looked at). Each split reports how many examples were shortened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from laffi_exp.core.prompts import Prompter
from laffi_exp.core.records import QAExample


def fit_contexts(
    examples: Sequence[QAExample],
    tokenizer,
    prompter: Prompter,
    max_prompt_tokens: int,
    around_answer: bool,
) -> tuple[list[QAExample], int]:
    """Examples whose longest prompt (``Prompter.longest_prompt``, with a reserve for the prediction
    already taken off ``max_prompt_tokens``) fits; returns them and how many were shortened."""
    out, shortened = [], 0
    for ex in examples:
        if len(tokenizer(prompter.longest_prompt(ex))["input_ids"]) <= max_prompt_tokens:
            out.append(ex)  # the common case: one tokenization, nothing to cut
            continue
        overhead = len(tokenizer(prompter.longest_prompt(dataclasses.replace(ex, context="")))["input_ids"])
        budget = max(8, max_prompt_tokens - overhead)
        offsets = tokenizer(ex.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) <= budget:  # the whole-prompt count differed only at the context's edges
            out.append(ex)
            continue
        shortened += 1
        first = 0
        if around_answer and ex.answers:
            start = ex.answer_starts[0] if ex.answer_starts else max(ex.context.find(ex.answers[0]), 0)
            end = start + len(ex.answers[0])
            a = next((i for i, (s, e) in enumerate(offsets) if e > start), 0)
            b = next((i for i, (s, e) in enumerate(offsets) if e >= end), len(offsets) - 1)
            first = max(0, min(a - (budget - (b - a + 1)) // 2, len(offsets) - budget))
        lo, hi = offsets[first][0], offsets[first + budget - 1][1]
        context = ex.context[lo:hi]
        answers, starts = [], []
        for text, s in zip(ex.answers, ex.answer_starts or (None,) * len(ex.answers)):
            s = ex.context.find(text) if s is None else s
            if lo <= s and s + len(text) <= hi:
                answers.append(text)
                starts.append(s - lo)
        # An answerable question stays answerable: in evaluation scoring must not change, and in
        # training an answer longer than the window still is the answer.
        if ex.answers and (not around_answer or not answers):
            answers, starts = list(ex.answers), [max(s - lo, 0) for s in ex.answer_starts]
        out.append(dataclasses.replace(ex, context=context, answers=tuple(answers), answer_starts=tuple(starts)))
    return out, shortened
