"""Prompt templates, the answer post-processing rule, and reading a verdict back out of feedback text.

Answer prompt (``answer_template``)::

    Context: {context}
    Question: {question}
    Answer:

the model continues with `` {answer}`` (the no-answer text for unanswerable questions). For a base
model, an ``instruction`` may come first, then ``shots`` solved questions of the training split (each
an answer prompt with its answer, then ``shot_separator``). The feedback prompt (``feedback_template``,
never with an instruction or shots) appends the predicted answer and asks for feedback::

    Context: {context}
    Question: {question}
    Answer: {prediction}
    Feedback:
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from laffi_exp.core.hashing import unit_hash
from laffi_exp.core.records import QAExample

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
    instruction: str = ""  # text before every answer prompt (and its shots), e.g. what a base model should write
    shots: int = 0  # solved training questions before every answer prompt (with_shots chooses them)
    shot_seed: int = 0  # which ones (fixed across run seeds, so every seed's base gives the same answers)
    shot_separator: str = "\n\n"
    # Wraps every prompt for the model, e.g. as one user turn of an instruct model's chat template.
    wrap: Callable[[str], str] | None = None
    prefix: str = ""  # the rendered shots (set by with_shots, not a config key)

    def _wrap(self, prompt: str) -> str:
        return self.wrap(prompt) if self.wrap is not None else prompt

    def answer_prompt(self, ex: QAExample) -> str:
        return self._wrap(
            self.instruction + self.prefix + self.answer_template.format(context=ex.context, question=ex.question)
        )

    def with_shots(self, train: Sequence[QAExample]) -> tuple[Prompter, list[str]]:
        """This prompter with its ``shots`` rendered as the prefix of every answer prompt, and their ids.
        The shots come from ``train`` only (never the test split): of 64 candidates drawn by a hash of
        (shot_seed, id), the shortest passages, half of them unanswerable (a base model learns from them
        to say the no-answer text), in the candidates' order."""
        if self.shots <= 0:
            return self, []
        seed = self.shot_seed
        ranked = sorted(train, key=lambda ex: unit_hash(seed, "shot", ex.id))[:64]
        n_unanswerable = self.shots // 2
        chosen = [ex for ex in sorted(ranked, key=lambda ex: len(ex.context)) if ex.answers][
            : self.shots - n_unanswerable
        ]
        chosen += [ex for ex in sorted(ranked, key=lambda ex: len(ex.context)) if not ex.answers][:n_unanswerable]
        chosen.sort(key=lambda ex: unit_hash(seed, "shot", ex.id))
        prefix = "".join(
            self.answer_template.format(context=ex.context, question=ex.question)
            + self.answer_target(ex.gold)
            + self.shot_separator
            for ex in chosen
        )
        return dataclasses.replace(self, prefix=prefix), [ex.id for ex in chosen]

    def answer_target(self, answer: str) -> str:
        """The completion for an answer prompt: a leading space, then the answer or the no-answer text."""
        return " " + (answer if answer else self.no_answer_text)

    def longest_prompt(self, ex: QAExample) -> str:
        """The longer of the answer prompt and the feedback prompt (with an empty prediction): what must
        fit the model's window. Without shots the feedback prompt is always the longer."""
        feedback = self.feedback_prompt(ex, "")
        if not self.prefix and not self.instruction:
            return feedback
        answer = self.answer_prompt(ex)
        return answer if len(answer) > len(feedback) else feedback

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
