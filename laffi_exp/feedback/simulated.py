"""Offline stand-ins for the two annotator pools.

- ``SimulatedHuman`` (the human pool by default): an accurate verdict, the right answer when the
  prediction is wrong, a short reason quoting the passage, varied phrasing.
- ``RuleBasedAnnotator`` (``feedback/synthetic=rule_based``): fixed phrasing with an error model standing
  in for an imperfect LLM annotator: a wrong verdict at ``wrong_verdict_rate``, no correction at
  ``missing_correction_rate``.
"""

from __future__ import annotations

from laffi_exp.core.hashing import unit_hash
from laffi_exp.core.records import QAExample
from laffi_exp.feedback.base import Annotator
from laffi_exp.scoring.squad_metrics import is_correct


def evidence(ex: QAExample) -> str:
    """The sentence of the passage that holds the first gold answer."""
    if not ex.answers:
        return ""
    start = ex.answer_starts[0] if ex.answer_starts else max(ex.context.find(ex.answers[0]), 0)
    cut = ex.context.rfind(". ", 0, start)
    left = cut + 2 if cut >= 0 else 0
    right = ex.context.find(". ", start + len(ex.answers[0]))
    return ex.context[left : right + 1 if right >= 0 else len(ex.context)].strip()


class SimulatedHuman(Annotator):
    """A careful human: always the right verdict and, when wrong, the right answer and why."""

    source = "human"

    def __init__(self, seed: int = 0, name: str = "simulated_human"):
        self.seed = seed
        self.name = name

    def annotate(self, ex: QAExample, prediction: str) -> str:
        style = int(unit_hash(self.seed, "style", ex.id) * 3)
        said = f'"{prediction}"' if prediction else "no answer"
        why = evidence(ex)
        if is_correct(ex, prediction):
            if ex.is_impossible:
                return (
                    "Correct. The passage does not say this, so there is no answer.",
                    "That's right: nothing in the passage answers the question.",
                    "Yes, this question cannot be answered from the passage.",
                )[style]
            return (
                f'Correct. The passage says: "{why}"',
                f"That's right: {said} is what the passage gives.",
                f'Yes, {said} is correct, since the passage says "{why}"',
            )[style]
        if ex.is_impossible:
            return (
                f"Incorrect. The passage never says this, so the question cannot be answered; {said} is a guess.",
                f"Wrong: {said} does not answer the question. The passage has no answer.",
                "Not quite: the passage does not give this, so the question cannot be answered.",
            )[style]
        return (
            f'Incorrect. The answer is "{ex.gold}" because the passage says "{why}"',
            f'Not quite: the passage says "{why}" so the answer should be "{ex.gold}".',
            f'Wrong: {said} is not what the question asks for; the answer is "{ex.gold}".',
        )[style]


class RuleBasedAnnotator(Annotator):
    """A template annotator with an error model, standing in for an LLM annotator offline."""

    source = "synthetic"

    def __init__(
        self,
        wrong_verdict_rate: float = 0.1,
        missing_correction_rate: float = 0.2,
        seed: int = 0,
        name: str = "rule_based",
    ):
        for key, rate in (
            ("wrong_verdict_rate", wrong_verdict_rate),
            ("missing_correction_rate", missing_correction_rate),
        ):
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
        return f'Incorrect. The answer is "{ex.gold}".'
