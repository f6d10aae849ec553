"""A small exported batch for the annotation app's tests, written by the real ``export_batch``."""

from __future__ import annotations

from pathlib import Path

from laffi_exp.human import export_batch
from laffi_exp.records import Answer, QAExample


def _example(i: int) -> QAExample:
    context = f"Passage {i} is about a painter. Ann{i} painted it in Oslo.\nA second line, with a comma."
    answers = (f"Ann{i}",) if i % 4 else ()
    return QAExample(
        f"q{i}", "t", context, f"Who painted picture {i}?", answers, (context.find("Ann"),) if answers else ()
    )


EXAMPLES = [_example(i) for i in range(12)]
# The model's answers: right on odd ids, "Oslo" (in the passage) or no answer on even ones.
PREDICTIONS = {ex.id: ex.gold if i % 2 else ("" if i % 6 == 0 else "Oslo") for i, ex in enumerate(EXAMPLES)}
ANSWERS = [Answer(ex.id, ex.question, PREDICTIONS[ex.id], "") for ex in EXAMPLES]
IDS = [ex.id for ex in EXAMPLES]


def make_batch(folder: Path, ids=IDS, include_gold: bool = False, name: str = "batch") -> Path:
    jsonl, _ = export_batch(EXAMPLES, ANSWERS, ids, folder / name, include_gold=include_gold)
    return jsonl
