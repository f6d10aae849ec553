"""Paired differences between systems that answered the same test questions in the same seed: per
question EM and F1 (the official rule), the mean difference, and its percentile-bootstrap CI."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from laffi_exp.core.io import read_json
from laffi_exp.runs.jobs import Job, label, note
from laffi_exp.scoring.squad_metrics import best_scores, golds_from_dataset
from laffi_exp.scoring.stats import BOOTSTRAP_SEED, RESAMPLES, bootstrap_ci

log = logging.getLogger(__name__)

PAIRED_COLUMNS = ["system_a", "system_b", "human_ratio", "seed", "n_seeds", "n_questions"] + [
    f"{m}_{part}" for m in ("exact", "f1") for part in ("a", "b", "diff", "ci_low", "ci_high")
]
# Paired systems: which run's method they come from and which predictions file holds their answers.
SYSTEMS = {
    "laffi": ("laffi", "predictions.json"),
    "laffi_reflect": ("laffi", "reflect_predictions.json"),
    "sft": ("sft", "predictions.json"),
    "base": (None, "base_predictions.json"),  # the untrained model, from the same run as system A
}
COMPARISONS = [
    ("laffi", "sft"),
    ("laffi_reflect", "sft"),
    ("laffi", "base"),
    ("laffi_reflect", "base"),
    ("sft", "base"),
    ("laffi_reflect", "laffi"),
]


# --- Paired differences -------------------------------------------------------------------------


def question_scores(golds: dict[str, list[str]], preds: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """EM and F1 (0 or 1, 0..1) of each question in ``golds`` order.

    The per-question rule of ``squad_metrics.best_scores`` (no no-answer probabilities): the best
    score over the gold texts, gold texts that normalise to nothing count as "no answer", and a
    question without a prediction scores 0. Their means times 100 are its ``exact`` and ``f1``.
    """
    em, f1 = [], []
    for qid, answers in golds.items():
        pred = preds.get(qid)
        exact, f1_score = (0, 0.0) if pred is None else best_scores(answers, pred)
        em.append(float(exact))
        f1.append(float(f1_score))
    return np.asarray(em, dtype=float), np.asarray(f1, dtype=float)


def paired_differences(
    jobs: Sequence[Job], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, notes: list[str] | None = None
) -> list[dict[str, Any]]:
    """``paired.csv`` rows for :data:`COMPARISONS`: one per seed, then one pooled (``seed`` = "pooled").

    Empty unless LaFFi and SFT runs share a seed. EM and F1 are in percent, as in ``metrics.json``.
    """
    runs: dict[tuple, Job] = {}
    for job in jobs:
        if job.metrics is None or job.seed is None or job.method not in ("laffi", "sft"):
            continue
        key = (job.method, job.human_ratio, job.seed)
        if key in runs:
            note(
                notes,
                f"paired: {label(job.method, job.human_ratio, 'direct')} seed {job.seed} has several runs; "
                f"using {runs[key].name}, not {job.name}",
            )
            continue
        runs[key] = job
    laffi_seeds = {s for m, _, s in runs if m == "laffi"}
    sft_seeds = {s for m, _, s in runs if m == "sft"}
    if not laffi_seeds & sft_seeds:
        return []

    cache: dict[Path, Any] = {}

    def load(path: Path) -> Any:
        if path not in cache:
            cache[path] = read_json(path)
        return cache[path]

    rows = []
    laffi_ratios = sorted({r for m, r, _ in runs if m == "laffi"}, key=lambda r: -1.0 if r is None else r)
    for a, b in COMPARISONS:
        for ratio in laffi_ratios if SYSTEMS[a][0] == "laffi" else [None]:
            per_seed = {}
            for s in sorted({s for _, _, s in runs}):
                job_a = runs.get((SYSTEMS[a][0], ratio, s))
                method_b = SYSTEMS[b][0]
                job_b = job_a if method_b in (None, SYSTEMS[a][0]) else runs.get((method_b, None, s))
                if job_a is None or job_b is None:
                    continue
                scored = _score_pair(job_a, a, job_b, b, load, notes)
                if scored is not None:
                    per_seed[s] = scored
            rows += _comparison_rows(a, b, ratio, per_seed, resamples, seed)
    return rows


def _score_pair(job_a: Job, a: str, job_b: Job, b: str, load, notes) -> dict[str, Any] | None:
    """Per-question EM and F1 of systems a and b (ids, em_a, f1_a, em_b, f1_b), or None if unscorable."""
    files = []
    for job, system in ((job_a, a), (job_b, b)):
        path = job.path / SYSTEMS[system][1]
        if not path.is_file():
            prefix = {"base": "base", "laffi_reflect": "test_reflect"}.get(system, "test")
            if f"{prefix}/exact" in (job.metrics or {}):  # the run scored it, so the file should be there
                note(notes, f"paired: job {job.name} has no {path.name}; {a} - {b} skips seed {job.seed}")
            return None
        files.append(path)
    try:
        golds = _golds(load(job_a.path / "eval_data.json"))
        if job_b is not job_a and _golds(load(job_b.path / "eval_data.json")) != golds:
            note(
                notes,
                f"paired: jobs {job_a.name} and {job_b.name} have different test questions; "
                f"{a} - {b} skips seed {job_a.seed}",
            )
            return None
        em_a, f1_a = question_scores(golds, load(files[0]))
        em_b, f1_b = question_scores(golds, load(files[1]))
    except (OSError, ValueError, KeyError, AttributeError) as err:
        note(notes, f"paired: {a} - {b} skips seed {job_a.seed} ({type(err).__name__}: {err})")
        return None
    return {"ids": list(golds), "a": np.stack([em_a, f1_a], 1), "b": np.stack([em_b, f1_b], 1)}


def _golds(eval_data: Any) -> dict[str, list[str]]:
    golds = golds_from_dataset(eval_data["data"] if isinstance(eval_data, dict) else eval_data)
    if not golds:
        raise ValueError("eval_data.json has no questions")
    return golds


def _comparison_rows(a: str, b: str, ratio, per_seed: dict[int, dict], resamples: int, seed: int) -> list[dict]:
    rows = []
    for s, scored in per_seed.items():
        diff = scored["a"] - scored["b"]
        rows.append(
            _paired_row(
                a,
                b,
                ratio,
                s,
                1,
                len(diff),
                scored["a"].mean(0),
                scored["b"].mean(0),
                bootstrap_ci(diff, np.ones(len(diff)), resamples, seed),
            )
        )
    if per_seed:
        # Pooled: cluster every seed's difference on a question under that question's id.
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = defaultdict(int)
        for scored in per_seed.values():
            for qid, d in zip(scored["ids"], scored["a"] - scored["b"]):
                sums[qid] = sums.get(qid, 0) + d
                counts[qid] += 1
        all_a = np.concatenate([sc["a"] for sc in per_seed.values()])
        all_b = np.concatenate([sc["b"] for sc in per_seed.values()])
        ci = bootstrap_ci(np.stack(list(sums.values())), np.array([counts[q] for q in sums]), resamples, seed)
        rows.append(_paired_row(a, b, ratio, "pooled", len(per_seed), len(sums), all_a.mean(0), all_b.mean(0), ci))
    return rows


def _paired_row(a, b, ratio, seed, n_seeds, n_questions, mean_a, mean_b, ci) -> dict[str, Any]:
    row: dict[str, Any] = {
        "system_a": a,
        "system_b": b,
        "human_ratio": ratio,
        "seed": seed,
        "n_seeds": n_seeds,
        "n_questions": n_questions,
    }
    low, high = ci
    for i, metric in enumerate(("exact", "f1")):
        row[f"{metric}_a"] = 100.0 * float(mean_a[i])
        row[f"{metric}_b"] = 100.0 * float(mean_b[i])
        row[f"{metric}_diff"] = 100.0 * float(mean_a[i] - mean_b[i])
        row[f"{metric}_ci_low"] = 100.0 * float(low[i])
        row[f"{metric}_ci_high"] = 100.0 * float(high[i])
    return row
