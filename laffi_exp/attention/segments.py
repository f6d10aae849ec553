"""The parts of a prompt as token masks: the template, the context, the question, the predicted answer
and the gold answer span inside the context, found as character spans of the rendered prompt (the run's
``prompt.answer_template`` / ``feedback_template``, formatted field by field) and mapped to tokens
through the tokenizer's offset mapping."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from laffi_exp.core.errors import ConfigError
from laffi_exp.core.prompts import Prompter
from laffi_exp.core.records import QAExample

FIELDS = ("context", "question", "prediction")  # the template's fields; the rest of the prompt is template
PROMPTS = ("answer", "feedback")
Span = tuple[int, int]  # [start, end) characters


@dataclass(frozen=True)
class SegmentedPrompt:
    """One prompt as the model reads it: its text, tokens, and a bool mask over the tokens per segment
    (``laffi_exp.attention.measures.SEGMENTS``); the first token belongs to no segment (the sink)."""

    id: str
    kind: str  # "answer" or "feedback"
    text: str
    input_ids: list[int]
    spans: dict[str, list[Span]]  # character spans of each field and of the gold answer in ``text``
    masks: dict[str, np.ndarray]

    @property
    def length(self) -> int:
        return len(self.input_ids)


def render(template: str, fields: Mapping[str, str]) -> tuple[str, dict[str, list[Span]]]:
    """``template.format(**fields)`` and the character spans of every field in the result (a field the
    template uses twice has two spans)."""
    formatter = string.Formatter()
    parts, spans, at = [], {}, 0
    for literal, name, spec, conversion in formatter.parse(template):
        parts.append(literal)
        at += len(literal)
        if name is None:
            continue
        if name not in fields:
            known = ", ".join(f"{{{f}}}" for f in fields)
            raise ConfigError(f"prompt template field {{{name}}}: expected only {known}")
        value = formatter.format_field(formatter.convert_field(fields[name], conversion), spec or "")
        spans.setdefault(name, []).append((at, at + len(value)))
        parts.append(value)
        at += len(value)
    return "".join(parts), spans


def gold_span(ex: QAExample) -> Span | None:
    """Where the first gold answer lies in ``ex.context``, or None (unanswerable, or outside a shortened
    context). Its ``answer_start`` when that points at the text, else the first occurrence."""
    if not ex.answers:
        return None
    text = ex.answers[0]
    start = ex.answer_starts[0] if ex.answer_starts else -1
    if not (start >= 0 and ex.context[start : start + len(text)] == text):
        start = ex.context.find(text)
    return (start, start + len(text)) if start >= 0 and text else None


def prompt_spans(
    prompter: Prompter, kind: str, ex: QAExample, prediction: str = ""
) -> tuple[str, dict[str, list[Span]]]:
    """The prompt text the run gave the model (``Prompter.answer_prompt`` / ``feedback_prompt``, chat
    wrapping included) and the character spans of its fields and of the gold answer in it."""
    if kind == "answer":
        template, text = prompter.answer_template, prompter.answer_prompt(ex)
        fields = {"context": ex.context, "question": ex.question}
    elif kind == "feedback":
        shown = prediction if prediction else prompter.no_answer_text  # as Prompter.feedback_prompt shows it
        template = prompter.feedback_template
        fields = {"context": ex.context, "question": ex.question, "prediction": shown}
        text = prompter.feedback_prompt(ex, prediction)
    else:
        raise ValueError(f"kind: expected one of {PROMPTS}, got {kind!r}")
    inner, spans = render(template, fields)
    # A chat template wraps the rendered prompt; it is found verbatim inside the wrapped text.
    shift = text.find(inner)
    if shift < 0:
        raise ConfigError(
            f"question {ex.id!r}: the {kind} prompt does not contain its rendered template; cannot find its segments"
        )
    spans = {name: [(s + shift, e + shift) for s, e in found] for name, found in spans.items()}
    gold = gold_span(ex)
    if gold is not None:
        spans["gold"] = [(s + gold[0], s + gold[1]) for s, _ in spans.get("context", [])]
    return text, spans


def token_masks(offsets: list[Span], spans: Mapping[str, list[Span]]) -> dict[str, np.ndarray]:
    """A bool mask over the tokens per segment. A token is in the field it shares the most characters
    with (a token that also covers a template space or newline belongs to the field); a token in no
    field is template. ``gold`` marks every token that overlaps the gold span. Token 0 is in none."""
    n = len(offsets)
    masks = {name: np.zeros(n, dtype=bool) for name in ("template", *FIELDS, "gold")}

    def overlap(s: int, e: int, name: str) -> int:
        return sum(max(0, min(e, b) - max(s, a)) for a, b in spans.get(name, []))

    for t, (s, e) in enumerate(offsets):
        if t == 0:
            continue
        shared = [overlap(s, e, name) if e > s else 0 for name in FIELDS]
        best = int(np.argmax(shared))
        masks[FIELDS[best] if shared[best] > 0 else "template"][t] = True
        masks["gold"][t] = e > s and overlap(s, e, "gold") > 0
    return masks


def segment_prompt(tokenizer, prompter: Prompter, kind: str, ex: QAExample, prediction: str = "") -> SegmentedPrompt:
    """The prompt, tokenized as generation tokenizes it (special tokens added), with its segment masks."""
    text, spans = prompt_spans(prompter, kind, ex, prediction)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{type(tokenizer).__name__}: the attention analysis needs a fast tokenizer (offset mappings)"
        )
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    return SegmentedPrompt(ex.id, kind, text, list(enc["input_ids"]), spans, token_masks(offsets, spans))
