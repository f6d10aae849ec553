"""``export-db``: the store's saved feedback as the human feedback file that ``feedback.human.path``
reads, one row per item chosen among its annotators, and ``annotation_report.json`` beside it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from laffi_exp.annotation_app.store import Store
from laffi_exp.core.errors import ConfigError
from laffi_exp.core.io import atomic_write_text, write_json
from laffi_exp.core.prompts import parse_feedback
from laffi_exp.feedback.human import read_rows
from laffi_exp.feedback.report import annotation_time, human_agreement

CHOICES = ("majority", "first", "all")
REPORT_NAME = "annotation_report.json"


def choose(annotations: list[dict[str, Any]], how: str) -> list[dict[str, Any]]:
    """Of one item's saved annotations (ordered by first save), the ones to export: ``first`` the
    earliest; ``majority`` the earliest of the most common verdict (a tie goes to the verdict given
    first); ``all`` every one."""
    if how == "all" or len(annotations) <= 1:
        return list(annotations)
    if how == "first":
        return annotations[:1]
    verdicts = [parse_feedback(a["feedback"])[0] for a in annotations]
    counts = Counter(verdicts)
    top = max(counts.values())
    winner = next(v for v in verdicts if counts[v] == top)  # in first-save order: the earliest among the tied
    return [annotations[verdicts.index(winner)]]


def export_db(store: Store, out: Path, how: str = "majority", force: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Write the rows and the report; returns both. ConfigError for an output that may not be written
    or a store with nothing saved."""
    if how not in CHOICES:
        raise ConfigError(f"--choose: expected one of {', '.join(CHOICES)}, got {how!r}")
    if out.suffix.lower() != ".jsonl":
        raise ConfigError(f"--out {out}: expected a .jsonl path (what feedback.human.path reads)")
    if out.exists() and not force:
        raise ConfigError(f"--out {out} exists: choose another path or pass --force")
    annotations = store.annotations()
    saved: dict[str, list[dict]] = {}
    for a in annotations:
        if a["status"] == "saved":
            saved.setdefault(a["item_id"], []).append(a)
    if not saved:
        raise ConfigError(f"--db {store.path}: no saved annotations yet, nothing to export")
    rows = [_row(a) for item in saved.values() for a in choose(item, how)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if how != "all":  # the very reader of feedback.human.path: a file it refuses is never written
        read_rows(out, text.encode())
    atomic_write_text(out, text)
    report = annotation_report(store, annotations, how, len(rows))
    write_json(out.with_name(REPORT_NAME), report)
    return rows, report


def _row(a: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": a["item_id"],
        "question": a["question"],
        "prediction": a["prediction"],
        "feedback": a["feedback"],
        "annotator_id": a["annotator_id"],
        "seconds": round(a["seconds"], 1),
    }


def annotation_report(store: Store, annotations: list[dict[str, Any]], how: str, rows: int) -> dict[str, Any]:
    """Coverage, per-annotator counts and time, human-human agreement (items with several annotators)."""
    meta, items = store.meta(), [i.id for i in store.items()]
    saved = [a for a in annotations if a["status"] == "saved"]
    per_item = int(meta["per_item"])
    saved_by_item = Counter(a["item_id"] for a in saved)
    flagged = {a["item_id"] for a in annotations if a["status"] == "flagged"}
    missing = [i for i in items if saved_by_item[i] == 0]
    annotators: dict[str, dict[str, Any]] = {}
    for a in annotations:
        entry = annotators.setdefault(
            a["annotator_id"], {"assigned": 0, "open": 0, "saved": 0, "flagged": 0, "seconds": []}
        )
        entry["assigned"] += 1
        entry[a["status"]] += 1
        if a["status"] == "saved":
            entry["seconds"].append(a["seconds"])
    return {
        "db": str(store.path.resolve()),
        "batch": meta["batch"],
        "choose": how,
        "rows": rows,
        "items": len(items),
        "per_item": per_item,
        "coverage": {
            "annotated": len(saved_by_item),
            "complete": sum(n >= per_item for n in saved_by_item.values()),
            "flagged": len(flagged - set(saved_by_item)),  # unclear to everyone who saw them so far
            "missing": len(missing),
            "missing_ids": missing,
        },
        "time": annotation_time([a["seconds"] for a in saved]),
        "agreement": human_agreement(
            [(a["item_id"], a["annotator_id"], parse_feedback(a["feedback"])[0]) for a in saved]
        ),
        "annotators": {
            name: {**{k: v for k, v in e.items() if k != "seconds"}, "time": annotation_time(e["seconds"])}
            for name, e in annotators.items()
        },
    }
