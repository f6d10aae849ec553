"""Prompt templates, the answer post-processing rule, and reading a verdict back out of feedback text.

Answer prompt (``answer_template``)::

    Context: {context}
    Question: {question}
    Answer:

the model continues with `` {answer}`` (the no-answer text for unanswerable questions). The feedback
prompt (``feedback_template``) appends the predicted answer and asks for feedback::

    Context: {context}
    Question: {question}
    Answer: {prediction}
    Feedback:
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

from laffi_exp.records import QAExample

ANSWER_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
FEEDBACK_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer: {prediction}\nFeedback:"
NO_ANSWER_TEXT = "unanswerable"
NO_ANSWER_PHRASES = ("unanswerable", "no answer", "cannot be answered", "not answerable", "n/a", "none")

_PREFIX = re.compile(r"^\s*(?:the\s+)?answer\s*(?:is)?\s*[:\-]\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"
_CORRECTION = re.compile(r"answer (?:is|should be|would be) \"([^\"]*)\"", re.IGNORECASE)
_NO_ANSWER_FEEDBACK = re.compile(
    r"no answer|cannot be answered|can't be answered|not answerable|unanswerable", re.IGNORECASE
)
_CORRECT_START = ("correct", "that's right", "that is right", "right", "yes", "exactly")
_INCORRECT_START = ("incorrect", "wrong", "not quite", "no,", "no.", "that's wrong", "that is wrong")


@dataclass(frozen=True)
class Prompter:
    """Renders prompts and targets; one instance per run, built from ``cfg.prompt``."""

    answer_template: str = ANSWER_TEMPLATE
    feedback_template: str = FEEDBACK_TEMPLATE
    no_answer_text: str = NO_ANSWER_TEXT
    no_answer_phrases: tuple[str, ...] = field(default=NO_ANSWER_PHRASES)
    # Wraps every prompt for the model, e.g. as one user turn of an instruct model's chat template.
    wrap: Callable[[str], str] | None = None

    def _wrap(self, prompt: str) -> str:
        return self.wrap(prompt) if self.wrap is not None else prompt

    def answer_prompt(self, ex: QAExample) -> str:
        return self._wrap(self.answer_template.format(context=ex.context, question=ex.question))

    def answer_target(self, answer: str) -> str:
        """The completion for an answer prompt: a leading space, then the answer or the no-answer text."""
        return " " + (answer if answer else self.no_answer_text)

    def feedback_prompt(self, ex: QAExample, prediction: str) -> str:
        shown = prediction if prediction else self.no_answer_text
        return self._wrap(self.feedback_template.format(context=ex.context, question=ex.question, prediction=shown))

    @staticmethod
    def feedback_target(feedback: str) -> str:
        return " " + feedback

    def to_answer(self, generation: str) -> str:
        """Turn a raw generation into a SQuAD answer: first line, no "Answer:" prefix, no quotes;
        a no-answer phrase becomes ""."""
        text = generation.strip().split("\n", 1)[0].strip()
        text = _PREFIX.sub("", text).strip()
        text = text.strip(_QUOTES).strip()
        if text.lower().rstrip(".!") in self._no_answer_set:
            return ""
        return text

    @cached_property
    def _no_answer_set(self) -> frozenset[str]:
        return frozenset(p.lower() for p in self.no_answer_phrases)


def parse_feedback(text: str) -> tuple[str, str | None]:
    """Read (verdict, correction) back out of a feedback text.

    verdict is "correct", "incorrect" (and, where it names one, the right answer as ``correction``),
    "no_answer" (the answer is wrong because the question has no answer; ``correction`` is ""), or
    "unknown" (no verdict can be read). correction is None when the feedback names no answer or
    judges the answer correct.
    """
    head = text.strip().lower()
    if head.startswith(_INCORRECT_START):
        verdict = "incorrect"
    elif head.startswith(_CORRECT_START):
        verdict = "correct"
    else:
        verdict = "unknown"
    if verdict == "correct":
        return verdict, None
    match = _CORRECTION.search(text)
    if match:
        return verdict, match.group(1).strip()
    if _NO_ANSWER_FEEDBACK.search(text):
        return "no_answer", ""
    return verdict, None
