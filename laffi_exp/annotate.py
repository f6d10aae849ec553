"""Stage 2, feedback annotation: natural-language feedback on each predicted answer, from a hybrid of
two annotator pools. ``feedback.human_ratio`` picks which examples go to the human pool, by a hash of
(seed, example id): the human set at a lower ratio is a subset of the set at a higher one.

Offline stand-ins for the two pools:
- ``SimulatedHuman`` (annotator ``simulated_human``): an accurate verdict, the right answer when the
  prediction is wrong, a short reason quoting the passage, varied phrasing.
- ``RuleBasedAnnotator`` (annotator ``rule_based``): fixed phrasing with an error model standing in for
  an imperfect LLM annotator: a wrong verdict at ``wrong_verdict_rate``, no correction at
  ``missing_correction_rate``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Protocol, Sequence

from laffi_exp.prompts import parse_feedback
from laffi_exp.records import Answer, Feedback, QAExample
from laffi_exp.squad_metrics import compute_exact

log = logging.getLogger(__name__)


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (stable across runs, machines and processes)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_correct(ex: QAExample, prediction: str) -> bool:
    """SQuAD exact match against any gold answer ("" against an unanswerable question)."""
    return any(compute_exact(g, prediction) for g in (ex.answers or ("",)))


def evidence(ex: QAExample) -> str:
    """The sentence of the passage that holds the first gold answer."""
    if not ex.answers:
        return ""
    start = ex.answer_starts[0] if ex.answer_starts else max(ex.context.find(ex.answers[0]), 0)
    cut = ex.context.rfind(". ", 0, start)
    left = cut + 2 if cut >= 0 else 0
    right = ex.context.find(". ", start + len(ex.answers[0]))
    return ex.context[left : right + 1 if right >= 0 else len(ex.context)].strip()


class Annotator(Protocol):
    """Gives natural-language feedback on one predicted answer."""

    name: str
    source: str  # "human" or "synthetic"

    def annotate(self, ex: QAExample, prediction: str) -> str: ...


class SimulatedHuman:
    """A careful human: always the right verdict and, when wrong, the right answer and why."""

    source = "human"

    def __init__(self, seed: int = 0, name: str = "simulated_human"):
        self.seed = seed
        self.name = name

    def annotate(self, ex: QAExample, prediction: str) -> str:
        style = int(unit_hash(self.seed, "style", ex.id) * 3)
        said = f"\"{prediction}\"" if prediction else "no answer"
        why = evidence(ex)
        if is_correct(ex, prediction):
            if ex.is_impossible:
                return (
                    "Correct. The passage does not say this, so there is no answer.",
                    "That's right: nothing in the passage answers the question.",
                    "Yes, this question cannot be answered from the passage.",
                )[style]
            return (
                f"Correct. The passage says: \"{why}\"",
                f"That's right: {said} is what the passage gives.",
                f"Yes, {said} is correct, since the passage says \"{why}\"",
            )[style]
        if ex.is_impossible:
            return (
                f"Incorrect. The passage never says this, so the question cannot be answered; {said} is a guess.",
                f"Wrong: {said} does not answer the question. The passage has no answer.",
                "Not quite: the passage does not give this, so the question cannot be answered.",
            )[style]
        return (
            f"Incorrect. The answer is \"{ex.gold}\" because the passage says \"{why}\"",
            f"Not quite: the passage says \"{why}\" so the answer should be \"{ex.gold}\".",
            f"Wrong: {said} is not what the question asks for; the answer is \"{ex.gold}\".",
        )[style]


class RuleBasedAnnotator:
    """A template annotator with an error model, standing in for an LLM annotator offline."""

    source = "synthetic"

    def __init__(
        self,
        wrong_verdict_rate: float = 0.1,
        missing_correction_rate: float = 0.2,
        seed: int = 0,
        name: str = "rule_based",
    ):
        for key, rate in (("wrong_verdict_rate", wrong_verdict_rate), ("missing_correction_rate", missing_correction_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"feedback.synthetic.{key}: expected a rate in [0, 1], got {rate}")
        self.wrong_verdict_rate = wrong_verdict_rate
        self.missing_correction_rate = missing_correction_rate
        self.seed = seed
        self.name = name

    def annotate(self, ex: QAExample, prediction: str) -> str:
        correct = is_correct(ex, prediction)
        if unit_hash(self.seed, "verdict", ex.id) < self.wrong_verdict_rate:
            correct = not correct  # the annotator misjudges this one
            if correct:
                return "Correct. The answer is supported by the passage."
            return "Incorrect. The answer is not supported by the passage."
        if correct:
            return "Correct. The answer is supported by the passage."
        if unit_hash(self.seed, "correction", ex.id) < self.missing_correction_rate:
            return "Incorrect. The answer is not supported by the passage."
        if ex.is_impossible:
            return "Incorrect. The question cannot be answered from the passage."
        return f"Incorrect. The answer is \"{ex.gold}\"."


def human_ids(ids: Sequence[str], human_ratio: float, seed: int) -> set[str]:
    """The examples that take human feedback: those whose hash of (seed, id) is below the ratio.

    Nested by construction: for one seed, the set at a lower ratio is a subset of the set at a higher
    ratio; the realised share is close to, not exactly, the ratio.
    """
    if not 0.0 <= human_ratio <= 1.0:
        raise ValueError(f"feedback.human_ratio: expected a number in [0, 1], got {human_ratio}")
    return {i for i in ids if unit_hash(seed, "human", i) < human_ratio}


def annotate(
    examples: Sequence[QAExample],
    answers: Sequence[Answer],
    human: Annotator,
    synthetic: Annotator,
    human_ratio: float,
    seed: int,
) -> list[Feedback]:
    """Feedback for every (example, answer) pair, from the human pool for the ratio's share and from
    the synthetic pool for the rest."""
    by_id = {a.id: a for a in answers}
    chosen = human_ids([ex.id for ex in examples], human_ratio, seed)
    out = []
    for ex in examples:
        prediction = by_id[ex.id].prediction
        annotator = human if ex.id in chosen else synthetic
        text = _clean(annotator.annotate(ex, prediction))
        verdict, correction = parse_feedback(text)
        out.append(
            Feedback(
                id=ex.id,
                question=ex.question,
                prediction=prediction,
                feedback=text,
                source=annotator.source,
                annotator=annotator.name,
                verdict=verdict,
                correction=correction,
            )
        )
    share = len(chosen) / max(len(examples), 1)
    log.info("Feedback: %d human (%.1f%%, ratio %.2f), %d synthetic", len(chosen), 100 * share, human_ratio, len(examples) - len(chosen))
    return out


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
