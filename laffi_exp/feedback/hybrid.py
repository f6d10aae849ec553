"""Hybrid feedback: which examples the human pool annotates and which the synthetic pool does.

``feedback.human_ratio`` picks the human share by a hash of (seed, example id): exactly round(ratio x n)
examples of each split, and the human set at a lower ratio is a subset of the set at a higher one. For
a share of those (``feedback.overlap_ratio``, nested the same way) the synthetic pool annotates too, so
that the feedback report can compare the pools on the same answers; that feedback is never trained on.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from laffi_exp.core.hashing import unit_hash
from laffi_exp.core.prompts import parse_feedback
from laffi_exp.core.records import Answer, Feedback, QAExample
from laffi_exp.feedback.base import Annotator

log = logging.getLogger(__name__)


def exact_share(ratio: float, n: int) -> int:
    """How many of ``n`` examples a ratio gives: round(ratio x n), halves rounded up."""
    return math.floor(ratio * n + 0.5)


def _ranked(ids: Sequence[str], seed: int) -> list[str]:
    """``ids`` in the order of their hash of (seed, id): the same for every ratio."""
    return sorted(set(ids), key=lambda i: (unit_hash(seed, "human", i), i))


def human_ids(ids: Sequence[str], human_ratio: float, seed: int) -> set[str]:
    """The examples that take human feedback: the first round(ratio x n) of ``ids`` ranked by a hash of
    (seed, id). Exactly the ratio's share, whatever n; nested: for one seed, the set at a lower ratio
    is a subset of the set at a higher ratio. Call it per split (each split gets its exact share)."""
    if not 0.0 <= human_ratio <= 1.0:
        raise ValueError(f"feedback.human_ratio: expected a number in [0, 1], got {human_ratio}")
    ranked = _ranked(ids, seed)
    return set(ranked[: exact_share(human_ratio, len(ranked))])


def human_ids_by_split(splits: Sequence[Sequence[QAExample]], human_ratio: float, seed: int) -> set[str]:
    """The human-feedback examples of several splits (train, validation), each split its exact share."""
    return set().union(*(human_ids([ex.id for ex in split], human_ratio, seed) for split in splits))


def overlap_ids(ids: Sequence[str], overlap_ratio: float, seed: int) -> set[str]:
    """Of ``ids`` (the human-feedback examples), those the synthetic pool annotates too, for the report:
    the first round(ratio x n) in the same ranking as ``human_ids``, so exact and nested across human
    ratios too (a prefix of a prefix)."""
    if not 0.0 <= overlap_ratio <= 1.0:
        raise ValueError(f"feedback.overlap_ratio: expected a number in [0, 1], got {overlap_ratio}")
    ranked = _ranked(ids, seed)
    return set(ranked[: exact_share(overlap_ratio, len(ranked))])


@dataclass(frozen=True)
class Annotation:
    """What stage 2 gives the pipeline."""

    feedback: list[Feedback]  # one per example, in example order: what trains
    overlap: list[tuple[Feedback, Feedback]]  # (human, synthetic) on the same answer: for the report only
    fallback: int  # examples the ratio gave to humans that took synthetic feedback (stale or missing in the file)


def annotate(
    examples: Sequence[QAExample],
    answers: Sequence[Answer],
    human: Annotator,
    synthetic: Annotator,
    human_ratio: float,
    seed: int,
    overlap_ratio: float = 0.0,
) -> Annotation:
    """Feedback for every (example, answer) pair, from the human pool for the ratio's share and from
    the synthetic pool for the rest. The human pool goes first; the synthetic pool is then prepared
    with the human items (less the overlap) and annotates its share plus the overlap in one batch."""
    predictions = {a.id: a.prediction for a in answers}
    chosen = human_ids([ex.id for ex in examples], human_ratio, seed)
    check = human.check_against(examples, answers, chosen)
    fallback: set[str] = set(check.fallback) if check is not None else set()
    by_human = [(ex, predictions[ex.id]) for ex in examples if ex.id in chosen and ex.id not in fallback]
    human_fb = {f.id: f for f in _annotate_all(human, by_human)}
    both = overlap_ids(list(human_fb), overlap_ratio, seed)
    by_synthetic = [(ex, predictions[ex.id]) for ex in examples if ex.id not in human_fb or ex.id in both]
    synthetic_fb = {}
    if by_synthetic:
        # Not the overlap: a shot of the very answer it judges would flatter the pools' agreement.
        synthetic.prepare([(ex, pred, human_fb[ex.id].feedback) for ex, pred in by_human if ex.id not in both])
        synthetic_fb = {f.id: f for f in _annotate_all(synthetic, by_synthetic)}
    feedback = [human_fb[ex.id] if ex.id in human_fb else synthetic_fb[ex.id] for ex in examples]
    overlap = [(human_fb[ex.id], synthetic_fb[ex.id]) for ex in examples if ex.id in both]
    log.info(
        "Feedback: %d human (%.1f%%, ratio %.2f), %d synthetic, %d fell back from human to synthetic, %d overlap",
        len(human_fb),
        100 * len(human_fb) / max(len(examples), 1),
        human_ratio,
        len(examples) - len(human_fb),
        len(fallback),
        len(overlap),
    )
    return Annotation(feedback=feedback, overlap=overlap, fallback=len(fallback))


def _annotate_all(annotator: Annotator, items: list[tuple[QAExample, str]]) -> list[Feedback]:
    """Feedback records for (example, prediction) items: in one call where the annotator batches."""
    if not items:
        return []
    texts = annotator.annotate_many(items)
    if len(texts) != len(items):
        raise RuntimeError(f"annotator {annotator.name}: {len(texts)} feedback texts for {len(items)} answers")
    out = []
    for (ex, prediction), text in zip(items, texts):
        text = _clean(text)
        verdict, correction = parse_feedback(text)
        out.append(
            Feedback(
                ex.id,
                ex.question,
                prediction,
                text,
                annotator.source,
                annotator.annotator_for(ex.id),
                verdict,
                correction,
            )
        )
    return out


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
