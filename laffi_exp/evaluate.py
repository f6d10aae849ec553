"""Stage 4, evaluation on held-out questions with SQuAD 2.0 scoring.

Two protocols:
- ``direct`` (the paper's): prompt for the answer (``laffi_exp.answer.predict_answers``), score it.
- ``reflect`` (our extension, for models trained on feedback): the model answers, then predicts the
  feedback on its own answer; where that feedback judges the answer wrong and names a correction
  (an answer, or "no answer"), the correction becomes the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from laffi_exp.answer import generate
from laffi_exp.prompts import Prompter, parse_feedback
from laffi_exp.records import Answer, QAExample
from laffi_exp.squad_metrics import score_examples


@dataclass(frozen=True)
class Reflection:
    id: str
    first_answer: str
    feedback: str
    verdict: str
    correction: str | None
    prediction: str


def score(examples: Sequence[QAExample], predictions: dict[str, str], prefix: str) -> dict[str, float]:
    """SQuAD 2.0 metrics under ``prefix/`` (``exact``, ``f1``, ``HasAns_exact``, ..., ``total``)."""
    metrics = score_examples({ex.id: list(ex.answers) for ex in examples}, predictions)
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def reflect(
    model,
    tokenizer,
    examples: Sequence[QAExample],
    answers: Sequence[Answer],
    prompter: Prompter,
    max_new_tokens: int,
    batch_size: int,
    generate_fn: Callable[[list[str], int], list[str]] | None = None,
) -> list[Reflection]:
    """Predict feedback on each of the model's own answers and apply the correction it names."""
    by_id = {a.id: a for a in answers}
    prompts = [prompter.feedback_prompt(ex, by_id[ex.id].prediction) for ex in examples]
    if generate_fn is not None:
        texts = generate_fn(prompts, max_new_tokens)
    else:
        texts = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc="reflect")
    out = []
    for ex, text in zip(examples, texts):
        first = by_id[ex.id].prediction
        text = text.strip().split("\n", 1)[0].strip()
        verdict, correction = parse_feedback(text)
        out.append(Reflection(ex.id, first, text, verdict, correction, reflected_answer(first, verdict, correction)))
    return out


def reflected_answer(first_answer: str, verdict: str, correction: str | None) -> str:
    """The reflect rule: keep the first answer unless the feedback judges it wrong and names a
    correction ("" = the question has no answer)."""
    return correction if verdict in ("incorrect", "no_answer") and correction is not None else first_answer
