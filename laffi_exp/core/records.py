"""The records that flow between pipeline stages; JSONL fields use the same names as these fields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QAExample:
    """One SQuAD-style question. ``answers`` empty means unanswerable."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...] = ()

    @property
    def is_impossible(self) -> bool:
        return len(self.answers) == 0

    @property
    def gold(self) -> str:
        """The first gold answer, or "" when unanswerable."""
        return self.answers[0] if self.answers else ""


@dataclass(frozen=True)
class Answer:
    """Stage 1 output: the model's answer to one question (``prediction`` "" = no answer)."""

    id: str
    question: str
    prediction: str
    generation: str


@dataclass(frozen=True)
class Feedback:
    """Stage 2 output: natural-language feedback on one predicted answer.

    ``verdict`` (correct / incorrect / no_answer / unknown) and ``correction`` (the answer it names; "" when it
    says the question has no answer; None when it names none) are what the feedback text says, parsed
    back from it (``laffi_exp.core.prompts.parse_feedback``), not what the annotator knew.
    """

    id: str
    question: str
    prediction: str
    feedback: str
    source: str  # "human" or "synthetic"
    annotator: str  # e.g. "simulated_human", "rule_based", or a human file's annotator_id ("human_file" without one)
    verdict: str
    correction: str | None
