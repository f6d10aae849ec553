"""The feedback report of a run: per source and per annotator, how often the feedback's verdict agrees
with the gold answers (SQuAD exact match and F1 of the judged prediction), how good its corrections are
and how long it is; and, where human and synthetic feedback judge the same answers, how often they agree.
For the annotation app: human-human agreement where items have several annotators, and time per item.

Shares are in [0, 1] (None where nothing was counted); ``exact`` and ``f1`` are on the SQuAD 0-100 scale.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from laffi_exp.core.config import flatten
from laffi_exp.core.records import Feedback, QAExample
from laffi_exp.scoring.squad_metrics import best_scores

VERDICTS = ("correct", "incorrect", "no_answer", "unknown")


def feedback_report(
    examples: Sequence[QAExample],
    feedback: Sequence[Feedback],
    overlap: Sequence[tuple[Feedback, Feedback]] | None = None,
) -> dict[str, Any]:
    """The report for the feedback on ``examples``; ``overlap`` holds (human, synthetic) pairs on the
    same answers (``laffi_exp.feedback.hybrid.Annotation.overlap``)."""
    gold = {ex.id: ex for ex in examples}
    unknown = [f.id for f in feedback if f.id not in gold] + [
        f.id for pair in overlap or () for f in pair if f.id not in gold
    ]
    if unknown:
        raise ValueError(
            f"feedback_report: {len(unknown)} feedback ids are not among the examples: {', '.join(unknown[:5])}"
        )
    report: dict[str, Any] = {
        "count": len(feedback),
        "sources": {name: _stats(group, gold) for name, group in _by(feedback, lambda f: f.source).items()},
        "annotators": {name: _stats(group, gold) for name, group in _by(feedback, lambda f: f.annotator).items()},
    }
    if overlap:
        report["overlap"] = _agreement(overlap, gold)
    return report


def numbers(report: dict[str, Any], prefix: str = "feedback_report") -> dict[str, float]:
    """The report's numbers as flat ``prefix/a/b`` keys (e.g. for a wandb summary); None left out."""
    flat = flatten(report, prefix, sep="/")
    return {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _stats(feedback: list[Feedback], gold: dict[str, QAExample]) -> dict[str, Any]:
    scores = {f.id: best_scores(gold[f.id].answers, f.prediction) for f in feedback}
    exact = {i: em for i, (em, _) in scores.items()}
    f1 = {i: f for i, (_, f) in scores.items()}
    judged = [f for f in feedback if f.verdict != "unknown"]
    said_correct = [f for f in judged if f.verdict == "correct"]
    said_incorrect = [f for f in judged if f.verdict in ("incorrect", "no_answer")]  # no_answer: wrong, none is right
    corrections = [f for f in said_incorrect if f.correction is not None]
    return {
        "count": len(feedback),
        "verdicts": {**dict.fromkeys(VERDICTS, 0), **Counter(f.verdict for f in feedback)},
        # Feedback that says the question has no answer (a correction of "").
        "says_no_answer": sum(f.correction == "" for f in feedback),
        # The verdict against the truth: "correct" iff the prediction matches a gold answer (EM = 1),
        # or, more leniently, overlaps one (F1 >= 0.5). Feedback with an unknown verdict is left out.
        "agreement_exact": _share(judged, lambda f: (f.verdict == "correct") == (exact[f.id] == 1)),
        "agreement_f1": _share(judged, lambda f: (f.verdict == "correct") == (f1[f.id] >= 0.5)),
        "judged_correct": _quality(said_correct, exact, f1),
        "judged_incorrect": _quality(said_incorrect, exact, f1),
        "correction_share": _share(said_incorrect, lambda f: f.correction is not None),
        "correction_exact": _share(corrections, lambda f: best_scores(gold[f.id].answers, f.correction)[0] == 1),
        "chars": _lengths([len(f.feedback) for f in feedback]),
        "words": _lengths([len(f.feedback.split()) for f in feedback]),
    }


def _agreement(pairs: Sequence[tuple[Feedback, Feedback]], gold: dict[str, QAExample]) -> dict[str, Any]:
    """Human against synthetic verdicts on the same answers: raw agreement and Cohen's kappa, and
    each side against the gold answers on just these answers."""
    humans, synthetics = [h for h, _ in pairs], [s for _, s in pairs]
    return {
        "count": len(pairs),
        "verdict_agreement": _share(pairs, lambda p: p[0].verdict == p[1].verdict),
        "kappa": cohen_kappa([h.verdict for h in humans], [s.verdict for s in synthetics]),
        "human_agreement_exact": _stats(humans, gold)["agreement_exact"],
        "synthetic_agreement_exact": _stats(synthetics, gold)["agreement_exact"],
    }


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items; None where it is undefined (no items,
    or both raters always give one and the same label, so chance agreement is 1)."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    chance = sum(count_a[k] * count_b[k] for k in count_a) / n**2
    return None if chance == 1 else (observed - chance) / (1 - chance)


def human_agreement(ratings: Sequence[tuple[str, str, str]]) -> dict[str, Any] | None:
    """Human-human agreement from (item id, annotator id, verdict) triples, on the items that two or
    more annotators judged: per pair of annotators, and pooled over all pairs (each pair of verdicts on
    one item counts once, the annotator whose id sorts first as rater A, for Cohen's kappa). None where
    no item has two annotators. Verdicts as ``laffi_exp.core.prompts.parse_feedback`` reads them."""
    by_item: dict[str, dict[str, str]] = {}
    for item, annotator, verdict in ratings:
        by_item.setdefault(item, {})[annotator] = verdict
    pairs: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for verdicts in by_item.values():
        names = sorted(verdicts)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                pairs.setdefault((a, b), []).append((verdicts[a], verdicts[b]))
    if not pairs:
        return None
    pooled = [p for group in pairs.values() for p in group]
    return {
        "items": sum(len(v) >= 2 for v in by_item.values()),
        **_rater_agreement(pooled),
        "pairs": {f"{a}|{b}": _rater_agreement(group) for (a, b), group in sorted(pairs.items())},
    }


def _rater_agreement(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {
        "count": len(pairs),
        "verdict_agreement": _share(pairs, lambda p: p[0] == p[1]),
        "kappa": cohen_kappa([a for a, _ in pairs], [b for _, b in pairs]),
    }


def annotation_time(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """Time spent per annotated item (one value per item and annotator, in seconds): so the cost of
    human feedback can be set against what it buys."""
    if not seconds:
        return {"count": 0, "total": 0.0, "median": None, "mean": None}
    total, median, mean = float(sum(seconds)), statistics.median(seconds), statistics.fmean(seconds)
    return {"count": len(seconds), "total": total, "median": median, "mean": mean}


def _share(items: Sequence, test: Callable[[Any], bool]) -> float | None:
    return sum(map(test, items)) / len(items) if items else None


def _quality(feedback: list[Feedback], exact: dict[str, float], f1: dict[str, float]) -> dict[str, Any]:
    """How good the predictions in ``feedback`` really are (SQuAD 0-100)."""
    return {
        "count": len(feedback),
        "exact": 100 * statistics.fmean(exact[f.id] for f in feedback) if feedback else None,
        "f1": 100 * statistics.fmean(f1[f.id] for f in feedback) if feedback else None,
    }


def _lengths(values: list[int]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def _by(feedback: Sequence[Feedback], key: Callable[[Feedback], str]) -> dict[str, list[Feedback]]:
    groups: dict[str, list[Feedback]] = {}
    for f in feedback:
        groups.setdefault(key(f), []).append(f)
    return groups
