"""Human feedback from people, through files: export a batch of predicted answers to annotate (JSONL
and CSV), and read the filled-in file back as the human pool (``feedback/human=file feedback.human.path=FILE``).

The file has one row per example: ``id``, ``prediction`` (the answer the annotator judged), ``feedback``
and, optionally, ``annotator_id``. Reading it refuses duplicate ids, empty feedback and rows without
the required columns; checking it against a run (``HumanFileAnnotator.check_against``) finds ids the
ratio gives to humans that the file lacks (missing) and rows written for another prediction (stale),
which refuse the run unless ``on_missing=synthetic``, and ids the run does not have (unknown: only
reported, since a file may cover more examples than one run uses). Imported files are only ever read.
An optional ``seconds`` column (time spent on the row, which the annotation app exports) goes into
the feedback report.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from laffi_exp.core.errors import ConfigError
from laffi_exp.core.io import atomic_write_text
from laffi_exp.core.prompts import NO_ANSWER_TEXT
from laffi_exp.core.records import Answer, QAExample
from laffi_exp.feedback.base import Annotator

KEY = "feedback.human.path"
REQUIRED = ("id", "prediction", "feedback")
ON_MISSING = ("error", "synthetic")


@dataclass(frozen=True)
class HumanRow:
    """One row of a human feedback file; ``line`` is where it ends in the file."""

    id: str
    prediction: str
    feedback: str
    annotator_id: str
    line: int
    seconds: float | None = None  # annotation time, where the file has it (the annotation app's export-db)


@dataclass(frozen=True)
class HumanFileCheck:
    """How a human feedback file fits one run's examples (ids in example order, unknown in file order)."""

    path: str
    sha256: str
    used: tuple[str, ...]  # assigned to humans, in the file, same prediction: they take the file's feedback
    missing: tuple[str, ...]  # assigned to humans, not in the file
    stale: tuple[str, ...]  # assigned to humans, in the file for another prediction
    unassigned: tuple[str, ...]  # in the file and the run, but the ratio gives them to the synthetic pool
    unknown: tuple[str, ...]  # in the file, not among the run's examples
    fallback: tuple[str, ...]  # missing + stale under on_missing=synthetic: they take synthetic feedback

    def summary(self) -> str:
        parts = [f"{len(self.used)} used"]
        if self.fallback:
            parts.append(f"{len(self.stale)} stale and {len(self.missing)} missing fall back to synthetic feedback")
        if self.unassigned:
            parts.append(f"{len(self.unassigned)} not assigned to humans at this ratio (unused)")
        if self.unknown:
            parts.append(f"{len(self.unknown)} unknown ids ignored ({id_list(self.unknown)})")
        return f"human feedback {self.path} (sha256 {self.sha256[:12]}): " + "; ".join(parts)


class HumanFileAnnotator(Annotator):
    """The human pool read from a JSONL or CSV file of feedback written by people."""

    source = "human"

    def __init__(
        self,
        path: str | Path,
        on_missing: str = "error",
        no_answer_text: str = NO_ANSWER_TEXT,
        name: str = "human_file",
    ):
        self.path = Path(path).expanduser().resolve()
        self.on_missing = on_missing
        self.no_answer_text = no_answer_text
        self.name = name  # for rows without an annotator_id
        self.sha256 = ""
        self._rows: dict[str, HumanRow] | None = None

    def check(self) -> None:
        """Read the file and refuse it (ConfigError naming the file, lines and ids) if any row is
        unusable; reads it once."""
        if self.on_missing not in ON_MISSING:
            raise ConfigError(
                f"feedback.human.on_missing: expected one of {', '.join(ON_MISSING)}, got {self.on_missing!r}"
            )
        if self._rows is None:
            raw = _read_bytes(self.path)
            self._rows = {row.id: row for row in read_rows(self.path, raw)}
            self.sha256 = hashlib.sha256(raw).hexdigest()

    @property
    def rows(self) -> dict[str, HumanRow]:
        self.check()
        return self._rows

    def time_report(self, ids: Iterable[str]) -> dict | None:
        """Annotation time of the rows of ``ids`` that carry ``seconds``; None where none does."""
        from laffi_exp.feedback.report import annotation_time

        seconds = [self.rows[i].seconds for i in ids if i in self.rows and self.rows[i].seconds is not None]
        return annotation_time(seconds) if seconds else None

    def annotator_for(self, example_id: str) -> str:
        return self.rows[example_id].annotator_id or self.name

    def annotate(self, ex: QAExample, prediction: str) -> str:
        if ex.id not in self.rows:
            raise ConfigError(f"{KEY}: {self.path} has no feedback for id {ex.id}")
        return self.rows[ex.id].feedback

    def check_against(
        self, examples: Sequence[QAExample], answers: Sequence[Answer], human_ids: Iterable[str]
    ) -> HumanFileCheck:
        """Match the file against a run: its examples, its predicted answers and the ids the ratio gives
        to humans. Raises ConfigError on missing or stale feedback unless ``on_missing`` is synthetic."""
        rows, predictions, assigned = self.rows, {a.id: a.prediction for a in answers}, set(human_ids)
        run_ids = [ex.id for ex in examples]
        in_file = [i for i in run_ids if i in assigned and i in rows]
        missing = [i for i in run_ids if i in assigned and i not in rows]
        stale = [i for i in in_file if not self._same(rows[i].prediction, predictions[i])]
        known = set(run_ids)
        check = HumanFileCheck(
            path=str(self.path),
            sha256=self.sha256,
            used=tuple(i for i in in_file if i not in stale),
            missing=tuple(missing),
            stale=tuple(stale),
            unassigned=tuple(i for i in run_ids if i not in assigned and i in rows),
            unknown=tuple(i for i in rows if i not in known),
            fallback=tuple(missing + stale) if self.on_missing == "synthetic" else (),
        )
        if (missing or stale) and self.on_missing == "error":
            problems = []
            if stale:
                shown = ", ".join(f"{i} (file {rows[i].prediction!r}, run {predictions[i]!r})" for i in stale[:3])
                more = f", ... ({len(stale)} in all)" if len(stale) > 3 else ""
                problems.append(
                    "stale feedback (written for another prediction than the run's) "
                    f"for {count(stale, 'id')}: {shown}{more}"
                )
            if missing:
                problems.append(
                    f"no feedback for {count(missing, 'id')} the ratio assigns to humans: {id_list(missing)}"
                )
            raise ConfigError(
                f"{KEY}: {self.path}: " + "; ".join(problems) + ". Export the current answers again "
                "(python -m laffi_exp.annotate export ...) and annotate them, or set "
                "feedback.human.on_missing=synthetic to give these examples synthetic feedback."
            )
        return check

    def _same(self, in_file: str, predicted: str) -> bool:
        """Equal after whitespace normalisation; a no-answer may be written "" or as the no-answer text."""
        in_file, predicted = " ".join(in_file.split()), " ".join(predicted.split())
        if predicted == "":
            return in_file.lower() in ("", self.no_answer_text.lower())
        return in_file == predicted


def read_rows(path: Path, raw: bytes) -> list[HumanRow]:
    """The rows of a human feedback file; ConfigError (naming the file, lines and ids) if any is unusable."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{KEY}: {path} is not UTF-8 text ({err})") from None
    if path.suffix.lower() == ".jsonl":
        records = _jsonl_records(path, text)
    elif path.suffix.lower() == ".csv":
        records = _csv_records(path, text)
    else:
        raise ConfigError(f"{KEY}: {path}: expected a .jsonl or .csv file")

    problems = []
    incomplete = [line for line, rec in records if any(k not in rec for k in REQUIRED)]
    if incomplete:
        problems.append(f"a required column ({', '.join(REQUIRED)}) is missing on {on_lines(incomplete)}")
    not_text = [
        line
        for line, rec in records
        if any(isinstance(rec.get(k), (dict, list, bool)) for k in (*REQUIRED, "annotator_id"))
    ]
    if not_text:
        problems.append(f"a value is not text on {on_lines(not_text)}")
    bad_seconds = [line for line, rec in records if _bad_seconds(rec.get("seconds"))]
    if bad_seconds:
        problems.append(f"seconds is not a number >= 0 on {on_lines(bad_seconds)}")
    rows = [
        HumanRow(
            _text(rec["id"]),
            _text(rec["prediction"]),
            _text(rec["feedback"]),
            _text(rec.get("annotator_id")),
            line,
            _seconds(rec.get("seconds")),
        )
        for line, rec in records
        if line not in incomplete and line not in not_text and line not in bad_seconds
    ]
    no_id = [r.line for r in rows if not r.id]
    if no_id:
        problems.append(f"the id is empty on {on_lines(no_id)}")
    lines: dict[str, list[int]] = {}
    for r in rows:
        lines.setdefault(r.id, []).append(r.line)
    duplicates = [f"{i} (lines {', '.join(map(str, at))})" for i, at in lines.items() if i and len(at) > 1]
    if duplicates:
        problems.append(f"{count(duplicates, 'duplicate id')}: {id_list(duplicates)}")
    empty = [r.id for r in rows if r.id and not r.feedback]
    if empty:
        problems.append(f"empty feedback for {count(empty, 'id')}: {id_list(empty)}")
    if problems:
        raise ConfigError(f"{KEY}: {path}: " + "; ".join(problems))
    if not rows:
        raise ConfigError(f"{KEY}: {path} has no rows")
    return rows


def export_batch(
    examples: Sequence[QAExample],
    answers: Sequence[Answer],
    ids: Iterable[str],
    out_prefix: str | Path,
    include_gold: bool = False,
    no_answer_text: str = NO_ANSWER_TEXT,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the examples of ``ids`` to annotate as ``<out_prefix>.jsonl`` and ``<out_prefix>.csv``:
    id, context, question, prediction (the no-answer text for ""), gold if asked, and empty
    ``feedback`` and ``annotator_id`` columns to fill in. Either file, filled in, is a human feedback file."""
    wanted = set(ids)
    unknown = sorted(wanted - {ex.id for ex in examples})
    if unknown:
        raise ConfigError(
            f"export: {count(unknown, 'id')} not among the run's training or validation examples: {id_list(unknown)}"
        )
    predictions = {a.id: a.prediction for a in answers}
    columns = [
        "id",
        "context",
        "question",
        "prediction",
        *(["gold"] if include_gold else []),
        "feedback",
        "annotator_id",
    ]
    rows = []
    for ex in examples:
        if ex.id in wanted:
            values = {
                "id": ex.id,
                "context": ex.context,
                "question": ex.question,
                "prediction": predictions[ex.id] or no_answer_text,
            }
            values["gold"] = " | ".join(dict.fromkeys(ex.answers)) or no_answer_text  # all distinct gold answers
            rows.append({k: values.get(k, "") for k in columns})
    jsonl_path, csv_path = batch_paths(out_prefix, overwrite)
    atomic_write_text(jsonl_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, buffer.getvalue())
    return jsonl_path, csv_path


def batch_paths(out_prefix: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """``<out_prefix>.jsonl`` and ``<out_prefix>.csv``; ConfigError if one exists and may not be overwritten."""
    prefix = Path(out_prefix)
    paths = prefix.with_name(prefix.name + ".jsonl"), prefix.with_name(prefix.name + ".csv")
    for path in paths:
        if path.exists() and not overwrite:
            raise ConfigError(f"export: {path} exists and may hold annotations; choose another --out or pass --force")
    return paths


def id_list(ids: Sequence[object], shown: int = 5) -> str:
    """The first few ids, and how many there are in all when that is more."""
    head = ", ".join(map(str, ids[:shown]))
    return head if len(ids) <= shown else f"{head}, ... ({len(ids)} in all)"


def count(items: Sequence[object], noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def on_lines(lines: Sequence[int]) -> str:
    return f"line {lines[0]}" if len(lines) == 1 else f"lines {id_list(lines)}"


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _seconds(value: object) -> float | None:
    """An optional ``seconds`` value (time spent annotating): None if absent or empty; ValueError
    unless it is a finite number >= 0 (or text that reads as one, from a CSV)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    if not 0 <= number < math.inf:
        raise ValueError(f"not a number of seconds: {value!r}")
    return number


def _bad_seconds(value: object) -> bool:
    try:
        _seconds(value)
    except ValueError:
        return True
    return False


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{KEY}: no such file {path}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{KEY}: cannot read {path} ({err.strerror})") from None


def _jsonl_records(path: Path, text: str) -> list[tuple[int, dict]]:
    records, bad = [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append(f"line {number} ({err.msg})")
            continue
        if not isinstance(record, dict):
            bad.append(f"line {number} (not a JSON object)")
            continue
        records.append((number, record))
    if bad:
        raise ConfigError(f"{KEY}: {path}: not a JSON object on {count(bad, 'line')}: {id_list(bad, 3)}")
    missing = [k for k in REQUIRED if records and all(k not in rec for _, rec in records)]
    if missing:
        raise ConfigError(
            f"{KEY}: {path}: no row has the required column(s) {', '.join(missing)} "
            f"(expected {', '.join(REQUIRED)}[, annotator_id])"
        )
    return records


def _csv_records(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        missing = [k for k in REQUIRED if k not in header]
        if missing:
            raise ConfigError(
                f"{KEY}: {path}: the header lacks the required column(s) {', '.join(missing)} "
                f"(expected {', '.join(REQUIRED)}[, annotator_id])"
            )
        records = [(reader.line_num, record) for record in reader]
    except csv.Error as err:
        raise ConfigError(f"{KEY}: {path}: line {reader.line_num}: {err}") from None
    extra = [line for line, record in records if None in record]  # DictReader keys surplus fields None
    if extra:
        raise ConfigError(
            f"{KEY}: {path}: more fields than the header on {on_lines(extra)} (a value with a comma needs quotes)"
        )
    short = [line for line, record in records if None in record.values()]  # and fills missing ones with None
    if short:
        raise ConfigError(f"{KEY}: {path}: fewer fields than the header on {on_lines(short)}")
    return records
