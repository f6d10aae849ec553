"""An exported batch (the JSONL that ``python -m laffi_exp.annotate export`` writes), read for the app,
and where the model's answer sits in its passage."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from laffi_exp.core.errors import ConfigError

COLUMNS = ("id", "context", "question", "prediction")  # what every exported row has (and feedback, annotator_id)
NOT_A_BATCH = "expected the .jsonl file that `python -m laffi_exp.annotate export` writes"


@dataclass(frozen=True)
class Item:
    """One example to annotate; ``prediction`` is as exported (the no-answer text for no answer)."""

    id: str
    question: str
    context: str
    prediction: str
    gold: str | None  # only in batches exported with --include-gold


@dataclass(frozen=True)
class Batch:
    path: Path
    items: tuple[Item, ...]
    fingerprint: str  # of the items' contents, not of the file: a moved or re-saved batch is the same batch

    @property
    def has_gold(self) -> bool:
        return any(item.gold is not None for item in self.items)


def read_batch(path: str | Path) -> Batch:
    """The batch in ``path``; ConfigError naming the file and line for anything else."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise ConfigError(
            f"batch {path}: {NOT_A_BATCH}" + (" (not the .csv beside it)" if path.suffix.lower() == ".csv" else "")
        )
    if not path.is_file():
        raise ConfigError(f"batch {path}: no such file ({NOT_A_BATCH})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"batch {path}: cannot read it as UTF-8 text ({err})") from None
    items, seen = [], set()
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        items.append(_item(path, number, line))
        if items[-1].id in seen:
            raise ConfigError(f"batch {path}: line {number}: the id {items[-1].id!r} comes twice")
        seen.add(items[-1].id)
    if not items:
        raise ConfigError(f"batch {path} has no rows ({NOT_A_BATCH})")
    return Batch(path.resolve(), tuple(items), fingerprint(items))


def _item(path: Path, number: int, line: str) -> Item:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"batch {path}: line {number} is not JSON ({err.msg}); {NOT_A_BATCH}") from None
    if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in COLUMNS):
        raise ConfigError(f"batch {path}: line {number} lacks the text column(s) {', '.join(COLUMNS)}; {NOT_A_BATCH}")
    if not row["id"].strip():
        raise ConfigError(f"batch {path}: line {number}: the id is empty")
    gold = row.get("gold")
    return Item(
        row["id"].strip(), row["question"], row["context"], row["prediction"], gold if isinstance(gold, str) else None
    )


def fingerprint(items: list[Item] | tuple[Item, ...]) -> str:
    rows = [[i.id, i.question, i.context, i.prediction, i.gold] for i in items]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def is_no_answer(prediction: str, no_answer_text: str) -> bool:
    return prediction.strip().lower() in ("", no_answer_text.strip().lower())


def answer_span(context: str, prediction: str) -> tuple[int, int] | None:
    """Where the prediction first occurs in the passage ([start, end) characters): as written, else
    ignoring case; None where it does not occur (the model may paraphrase)."""
    answer = prediction.strip()
    if not answer:
        return None
    start = context.find(answer)
    if start >= 0:
        return start, start + len(answer)
    match = re.search(re.escape(answer), context, re.IGNORECASE)  # offsets into the passage as written
    return match.span() if match else None
