"""The sweep report: tables, a figure and paired comparisons for a Hydra multirun of the pipeline.

    python -m laffi_exp.report SWEEP_DIR [--out DIR]

or at the end of every sweep through :class:`ReportCallback` (``hydra.callbacks``). Each job dir under
SWEEP_DIR (any depth: a folder holding ``metrics.json`` or ``.hydra/``) is one run; a job without
``metrics.json`` crashed or is still running and is reported as missing. Files written (atomically):

- ``results.csv``: one row per run, every numeric metric of ``metrics.json`` as a column.
- ``summary.csv``: per method, human ratio and protocol, statistics over seeds.
- ``ablation.png``: EM and F1 against the human share of feedback; SFT and base as reference lines.
- ``results.md``: the summary as a markdown table (also printed by the CLI).
- ``paired.csv``: paired differences (LaFFi − SFT, LaFFi − base, SFT − base, ...), only when LaFFi and
  SFT runs share a seed (a compare-methods sweep).
- ``attention.csv``: the headline attention measures over seeds, when jobs hold ``attention/summary.csv``.

Statistics over seeds (``summary.csv``): a seed counts once (several runs of one seed are averaged,
with a warning); mean, sample std (ddof=1) and the 95% CI half-width t(0.975, n−1)·std/√n. "base" is
the untrained model that every run also scores on its test set, so it has one value per seed.

Paired differences (``paired.csv``): systems A and B answered the same test questions in the same
seed. Each question's EM and F1 are scored for both (the official SQuAD 2.0 rules of
:mod:`laffi_exp.squad_metrics`; a missing prediction scores 0) and the estimate is the mean per-question
difference A − B. Its 95% CI is a percentile bootstrap over test questions (2000 resamples, fixed
seed, the same resampled questions for EM and F1). The pooled row averages over every (seed,
question) pair and resamples question ids, all seeds' differences on one question together: a
question's difficulty is shared across seeds. Seeds are not resampled, so the CI says how much the
difference depends on the questions drawn, for these trained models.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import logging
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from laffi_exp.errors import ConfigError
from laffi_exp.io import atomic_savefig, atomic_write_text, read_json
from laffi_exp.squad_metrics import compute_exact, compute_f1, golds_from_dataset, normalize_answer

log = logging.getLogger(__name__)

# SQuAD 2.0 metrics summarised over seeds, named as in metrics.json after the "<prefix>/".
METRICS = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1")  # best_*: with na_probs
# Protocol -> metrics.json prefix of the fine-tuned model's scores (see laffi_exp.evaluate).
PROTOCOLS = {"direct": "test", "reflect": "test_reflect"}
RESULTS_LEAD = ["job", "method", "human_ratio", "seed", "status", "time/seconds"]
SUMMARY_LEAD = ["method", "human_ratio", "protocol", "n", "seeds"]
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
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30; the normal 1.96 beyond.
_T975 = (
    12.7062047, 4.3026527, 3.1824463, 2.7764451, 2.5705818, 2.4469119, 2.3646243, 2.3060041, 2.2621572,
    2.2281389, 2.2009852, 2.1788128, 2.1603687, 2.1447867, 2.1314495, 2.1199053, 2.1098156, 2.1009220,
    2.0930241, 2.0859634, 2.0796138, 2.0738731, 2.0686576, 2.0638986, 2.0595386, 2.0555294, 2.0518305,
    2.0484071, 2.0452296, 2.0422725,
)
_ORDER = {"base": 0, "sft": 1, "laffi": 2}


@dataclass(frozen=True)
class Job:
    """One job dir of the sweep. ``metrics`` is None when it has no ``metrics.json``."""

    name: str  # path relative to the sweep dir
    path: Path
    method: str | None
    human_ratio: float | None  # laffi only: the configured feedback.human_ratio
    seed: int | None
    metrics: dict[str, float] | None


@dataclass
class Report:
    sweep_dir: Path
    out_dir: Path
    jobs: list[Job]
    summary: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    markdown: str
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def missing(self) -> list[Job]:
        return [job for job in self.jobs if job.metrics is None]


def _note(notes: list[str] | None, message: str) -> None:
    log.warning(message)
    if notes is not None:
        notes.append(message)


# --- Reading the sweep --------------------------------------------------------------------------


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Every folder under ``sweep_dir`` (itself included) that holds ``metrics.json`` or ``.hydra/``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(sweep_dir):
        if "metrics.json" in filenames or ".hydra" in dirnames:
            found.append(Path(dirpath))
            dirnames.clear()  # a job's own folders (adapter/, csv/) are not jobs
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def _natural_key(name: str) -> list:
    # Job 10 after job 9, as Hydra numbers them.
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def load_job(path: Path, sweep_dir: Path, notes: list[str] | None = None) -> Job:
    """Read one job dir: its config (``config.yaml`` the pipeline writes resolved, else
    ``.hydra/config.yaml``) and its numeric metrics."""
    rel = path.relative_to(sweep_dir).as_posix()
    name = path.name if rel == "." else rel
    cfg = _load_config(path, name, notes)
    method = _select(cfg, "method.name")
    seed = _select(cfg, "seed")
    ratio = _select(cfg, "feedback.human_ratio")
    metrics = None
    if (path / "metrics.json").is_file():
        try:
            raw = read_json(path / "metrics.json")
            metrics = {k: v for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        except (OSError, ValueError, AttributeError) as err:
            _note(notes, f"job {name}: unreadable metrics.json ({err}); counted as missing")
    return Job(
        name=name,
        path=path,
        method=str(method) if method is not None else None,
        human_ratio=float(ratio) if method == "laffi" and isinstance(ratio, (int, float)) else None,
        seed=int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None,
        metrics=metrics,
    )


def _load_config(path: Path, name: str, notes: list[str] | None) -> DictConfig | None:
    for candidate in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        if candidate.is_file():
            try:
                return OmegaConf.load(candidate)
            except Exception as err:  # a YAML or OmegaConf error: try the other file
                _note(notes, f"job {name}: cannot read {candidate.name} ({err})")
    _note(notes, f"job {name}: no config.yaml or .hydra/config.yaml; method, ratio and seed unknown")
    return None


def _select(cfg: DictConfig | None, key: str) -> Any:
    # Interpolations such as ${hydra:...} do not resolve outside Hydra: they read as None here.
    if cfg is None:
        return None
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)


def load_jobs(sweep_dir: Path, notes: list[str] | None = None) -> list[Job]:
    return [load_job(path, sweep_dir, notes) for path in find_job_dirs(sweep_dir)]


# --- Per-run table ------------------------------------------------------------------------------


def results_table(jobs: Sequence[Job]) -> tuple[list[str], list[list[Any]]]:
    """``results.csv``: the lead columns, then the union of metric keys, sorted."""
    keys = sorted({k for job in jobs if job.metrics for k in job.metrics} - set(RESULTS_LEAD))
    columns = RESULTS_LEAD + keys
    rows = []
    for job in jobs:
        metrics = job.metrics or {}
        status = "ok" if job.metrics is not None else "missing"
        lead = [job.name, job.method, job.human_ratio, job.seed, status, metrics.get("time/seconds")]
        rows.append(lead + [metrics.get(k) for k in keys])
    return columns, rows


# --- Statistics over seeds ----------------------------------------------------------------------


@functools.cache
def t_quantile_975(df: int) -> float:
    """t(0.975, df): scipy's when installed, else the table above (1.96 beyond df 30)."""
    try:
        from scipy import stats
    except ImportError:
        return _T975[df - 1] if df <= len(_T975) else 1.96
    return float(stats.t.ppf(0.975, df))


def mean_std_ci(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """Mean, sample std (ddof=1) and 95% CI half-width; std and CI are None for a single value."""
    if not values:
        return None, None, None
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None, None
    std = float(np.std(values, ddof=1))
    return mean, std, t_quantile_975(len(values) - 1) * std / math.sqrt(len(values))


def scores_by_seed(jobs: Sequence[Job], notes: list[str] | None = None) -> dict[tuple, dict[int, dict[str, float]]]:
    """(method, human_ratio, protocol) -> seed -> {metric: value}, one entry per seed.

    Several runs of one seed are averaged. Every run reports "base" (the untrained model), so base
    repeats by design and is only worth a warning when the repeats disagree.
    """
    runs: dict[tuple, dict[int, list[tuple[str, dict[str, float]]]]] = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        if job.metrics is None:
            continue
        if job.method is None or job.seed is None:
            _note(notes, f"job {job.name}: method or seed unknown; left out of the summary")
            continue
        series = [((job.method, job.human_ratio, protocol), prefix) for protocol, prefix in PROTOCOLS.items()]
        series.append((("base", None, "direct"), "base"))
        for key, prefix in series:
            values = {m: job.metrics[f"{prefix}/{m}"] for m in METRICS if f"{prefix}/{m}" in job.metrics}
            if values:
                runs[key][job.seed].append((job.name, values))

    result = {}
    for key, by_seed in sorted(runs.items(), key=lambda item: _series_order(*item[0])):
        result[key] = {}
        for seed, named in sorted(by_seed.items()):
            values = [v for _, v in named]
            averaged = {m: float(np.mean([v[m] for v in values if m in v])) for m in METRICS if any(m in v for v in values)}
            differ = any(abs(v[m] - averaged[m]) > 1e-9 for v in values for m in v)
            if len(values) > 1 and (key[0] != "base" or differ):
                names = ", ".join(name for name, _ in named)
                what = "runs with different numbers" if key[0] == "base" else "runs"
                _note(notes, f"{_label(*key)}: seed {seed} has {len(values)} {what} ({names}); their mean is used")
            result[key][seed] = averaged
    return result


def _series_order(method: str, ratio: float | None, protocol: str) -> tuple:
    return (_ORDER.get(method, len(_ORDER)), method, -1.0 if ratio is None else ratio, list(PROTOCOLS).index(protocol))


def _label(method: str, ratio: float | None, protocol: str) -> str:
    share = f" {ratio * 100:g}% human" if ratio is not None else ""
    return f"{method}{share} ({protocol})"


def summarize(jobs: Sequence[Job], notes: list[str] | None = None) -> list[dict[str, Any]]:
    """``summary.csv`` rows: n seeds, then mean, std and ci95 of every SQuAD metric."""
    rows = []
    for (method, ratio, protocol), by_seed in scores_by_seed(jobs, notes).items():
        row: dict[str, Any] = {
            "method": method,
            "human_ratio": ratio,
            "protocol": protocol,
            "n": len(by_seed),
            "seeds": " ".join(str(s) for s in by_seed),
        }
        for metric in METRICS:
            values = [scores[metric] for scores in by_seed.values() if metric in scores]
            if values and len(values) < len(by_seed):
                _note(notes, f"{_label(method, ratio, protocol)}: {metric} reported by {len(values)} of {len(by_seed)} seeds")
            row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_ci95"] = mean_std_ci(values)
        rows.append(row)
    return rows


def summary_columns() -> list[str]:
    return SUMMARY_LEAD + [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "ci95")]


# --- Paired differences -------------------------------------------------------------------------


def question_scores(golds: dict[str, list[str]], preds: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """EM and F1 (0 or 1, 0..1) of each question in ``golds`` order.

    The per-question rule of ``squad_metrics.score_examples`` (no no-answer probabilities): the best
    score over the gold texts, gold texts that normalise to nothing count as "no answer", and a
    question without a prediction scores 0. Their means times 100 are its ``exact`` and ``f1``.
    """
    em, f1 = [], []
    for qid, answers in golds.items():
        pred = preds.get(qid)
        if pred is None:
            em.append(0.0)
            f1.append(0.0)
            continue
        references = [a for a in answers if normalize_answer(a)] or [""]
        em.append(max(compute_exact(a, pred) for a in references))
        f1.append(max(compute_f1(a, pred) for a in references))
    return np.asarray(em, dtype=float), np.asarray(f1, dtype=float)


def bootstrap_ci(
    sums: np.ndarray, counts: np.ndarray, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of ``sums.sum(0) / counts.sum()`` with clusters (rows) resampled.

    ``sums`` is (clusters, k): per question, the sum of its differences over seeds, for k metrics;
    ``counts`` how many differences each question has. With one seed this is the plain bootstrap of
    a mean. Returns the (k,) lower and upper bounds.
    """
    sums = np.asarray(sums, dtype=float).reshape(len(sums), -1)
    counts = np.asarray(counts, dtype=float)
    n = len(sums)
    rng = np.random.default_rng(seed)
    estimates = np.empty((resamples, sums.shape[1]))
    step = max(1, 2_000_000 // n)  # bounds the memory of one block of resamples
    for start in range(0, resamples, step):
        idx = rng.integers(0, n, size=(min(step, resamples - start), n))
        estimates[start : start + len(idx)] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1, keepdims=True)
    alpha = (1 - level) / 2
    low, high = np.quantile(estimates, [alpha, 1 - alpha], axis=0)
    return low, high


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
            _note(notes, f"paired: {_label(job.method, job.human_ratio, 'direct')} seed {job.seed} has several runs; using {runs[key].name}, not {job.name}")
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
                _note(notes, f"paired: job {job.name} has no {path.name}; {a} - {b} skips seed {job.seed}")
            return None
        files.append(path)
    try:
        golds = _golds(load(job_a.path / "eval_data.json"))
        if job_b is not job_a and _golds(load(job_b.path / "eval_data.json")) != golds:
            _note(notes, f"paired: jobs {job_a.name} and {job_b.name} have different test questions; {a} - {b} skips seed {job_a.seed}")
            return None
        em_a, f1_a = question_scores(golds, load(files[0]))
        em_b, f1_b = question_scores(golds, load(files[1]))
    except (OSError, ValueError, KeyError, AttributeError) as err:
        _note(notes, f"paired: {a} - {b} skips seed {job_a.seed} ({type(err).__name__}: {err})")
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
        rows.append(_paired_row(a, b, ratio, s, 1, len(diff), scored["a"].mean(0), scored["b"].mean(0),
                                bootstrap_ci(diff, np.ones(len(diff)), resamples, seed)))
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
    row: dict[str, Any] = {"system_a": a, "system_b": b, "human_ratio": ratio, "seed": seed,
                           "n_seeds": n_seeds, "n_questions": n_questions}
    low, high = ci
    for i, metric in enumerate(("exact", "f1")):
        row[f"{metric}_a"] = 100.0 * float(mean_a[i])
        row[f"{metric}_b"] = 100.0 * float(mean_b[i])
        row[f"{metric}_diff"] = 100.0 * float(mean_a[i] - mean_b[i])
        row[f"{metric}_ci_low"] = 100.0 * float(low[i])
        row[f"{metric}_ci_high"] = 100.0 * float(high[i])
    return row


# --- Figure -------------------------------------------------------------------------------------


def plot_ablation(summary: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """EM and F1 against the human share: LaFFi (direct, reflect) with 95% CI error bars, SFT and base
    as horizontal lines with their CI band. Returns None (nothing written) when nothing can be drawn."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state inside a Hydra callback

    panels = [(m, y) for m, y in (("exact", "EM (%)"), ("f1", "F1 (%)")) if any(r[f"{m}_mean"] is not None for r in summary)]
    if not panels:
        return None
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    # (method, protocol, label, colour, x offset): the two protocols share x values, so they are drawn
    # one point apart to keep both error bars visible.
    lines = [("laffi", "direct", "LaFFi (direct)", "C0", -1.0), ("laffi", "reflect", "LaFFi (reflect)", "C1", 1.0)]
    references = [("sft", "SFT", "C2"), ("base", "base (untrained)", "C7")]
    for ax, (metric, ylabel) in zip(axes, panels):
        for method, protocol, label, color, offset in lines:
            points = sorted(
                (r["human_ratio"] * 100 + offset, r[f"{metric}_mean"], r[f"{metric}_ci95"] or 0.0)
                for r in summary
                if r["method"] == method and r["protocol"] == protocol and r["human_ratio"] is not None
                and r[f"{metric}_mean"] is not None
            )
            if points:
                x, y, err = zip(*points)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=color, label=label)
        for method, label, color in references:
            row = next((r for r in summary if r["method"] == method and r["protocol"] == "direct"), None)
            if row is None or row[f"{metric}_mean"] is None:
                continue
            mean, ci = row[f"{metric}_mean"], row[f"{metric}_ci95"]
            ax.axhline(mean, linestyle="--", color=color, label=f"{label}, n={row['n']}")
            if ci:
                ax.axhspan(mean - ci, mean + ci, color=color, alpha=0.15, linewidth=0)
        ax.set_xlim(-5, 105)
        ax.set_xlabel("human-annotated share of feedback (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{title} (mean over seeds, 95% CI)")
    return atomic_savefig(fig, path, dpi=120)


# --- Markdown and CSV ---------------------------------------------------------------------------


def _pm(mean: float | None, ci: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.1f} ± {ci:.1f}" if ci is not None else f"{mean:.1f}"


def _share(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio * 100:g}%"


_SYSTEM_LABELS = {"laffi": "laffi", "laffi_reflect": "laffi (reflect)", "sft": "sft", "base": "base"}


def markdown(title: str, jobs: Sequence[Job], summary: Sequence[dict], paired: Sequence[dict], notes: Sequence[str],
             attention: str = "") -> str:
    done = [j for j in jobs if j.metrics is not None]
    missing = [j.name for j in jobs if j.metrics is None]
    lines = [f"# {title}", "", f"{len(jobs)} job(s): {len(done)} with metrics"]
    if missing:
        lines[-1] += f", {len(missing)} without (crashed or still running): {', '.join(missing)}"
    lines[-1] += "."
    lines += [
        "",
        "| method | human share | protocol | EM | F1 | n |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['method']} | {_share(r['human_ratio'])} | {r['protocol']} | {_pm(r['exact_mean'], r['exact_ci95'])} "
            f"| {_pm(r['f1_mean'], r['f1_ci95'])} | {r['n']} |"
        )
    lines += ["", "EM and F1 in %: mean over seeds ± 95% CI half-width (Student t); n = seeds. "
              "base is the untrained model, scored in every run on the same test questions."]
    pooled = [r for r in paired if r["seed"] == "pooled"]
    if pooled:
        lines += [
            "",
            "## Paired differences",
            "",
            "| A − B | human share (A) | seeds | questions | ΔEM [95% CI] | ΔF1 [95% CI] |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in pooled:
            lines.append(
                f"| {_SYSTEM_LABELS[r['system_a']]} − {_SYSTEM_LABELS[r['system_b']]} | {_share(r['human_ratio'])} | {r['n_seeds']} | {r['n_questions']} "
                f"| {r['exact_diff']:+.1f} [{r['exact_ci_low']:+.1f}, {r['exact_ci_high']:+.1f}] "
                f"| {r['f1_diff']:+.1f} [{r['f1_ci_low']:+.1f}, {r['f1_ci_high']:+.1f}] |"
            )
        lines += ["", "Per question, pooled over seeds; CI: percentile bootstrap over test questions "
                  f"({RESAMPLES} resamples). Per seed: paired.csv."]
    if attention:
        lines += attention.rstrip("\n").split("\n")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)  # None becomes an empty cell
    return buf.getvalue()


def attention_section(jobs: Sequence[Job], out: Path, notes: list[str]) -> tuple[list[Path], str]:
    """``attention.csv`` and the results.md section: the headline attention measures of the jobs that hold
    ``attention/summary.csv`` (``analysis.attention=true``), over seeds per method and human share."""
    from laffi_exp.attention.report import sweep_csv, sweep_markdown, sweep_rows

    rows = sweep_rows(jobs, notes)
    if not rows:
        return [], ""
    return [atomic_write_text(out / "attention.csv", sweep_csv(rows))], sweep_markdown(rows)


# --- The report ---------------------------------------------------------------------------------


def build_report(
    sweep_dir: str | Path, out_dir: str | Path | None = None, resamples: int = RESAMPLES, bootstrap_seed: int = BOOTSTRAP_SEED
) -> Report:
    """Read the sweep and write every report file into ``out_dir`` (default: the sweep dir).

    Raises ConfigError when the sweep dir does not exist or no job in it has metrics.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep dir not found: {sweep_dir}")
    out = Path(out_dir) if out_dir is not None else sweep_dir
    notes: list[str] = []
    jobs = load_jobs(sweep_dir, notes)
    if not any(job.metrics is not None for job in jobs):
        raise ConfigError(
            f"{sweep_dir}: no job with metrics.json ({len(jobs)} job dir(s) found); "
            "expected a Hydra sweep dir of laffi_exp runs"
        )
    missing = [job.name for job in jobs if job.metrics is None]
    if missing:
        _note(notes, f"{len(missing)} job(s) without metrics.json (crashed or still running): {', '.join(missing)}")

    summary = summarize(jobs, notes)
    paired = paired_differences(jobs, resamples, bootstrap_seed, notes)
    title = f"Sweep {'/'.join(sweep_dir.resolve().parts[-2:])}"

    out.mkdir(parents=True, exist_ok=True)
    report = Report(sweep_dir, out, jobs, summary, paired, markdown="", notes=notes)
    report.files.append(atomic_write_text(out / "results.csv", _csv_text(*results_table(jobs))))
    columns = summary_columns()
    report.files.append(atomic_write_text(out / "summary.csv", _csv_text(columns, ([r[c] for c in columns] for r in summary))))
    if paired:
        report.files.append(atomic_write_text(out / "paired.csv", _csv_text(PAIRED_COLUMNS, ([r[c] for c in PAIRED_COLUMNS] for r in paired))))
    try:
        figure = plot_ablation(summary, out / "ablation.png", title)
    except ImportError as err:  # matplotlib is optional for the tables
        figure = None
        _note(notes, f"ablation.png not drawn: {err}")
    if figure is not None:
        report.files.append(figure)
    attention_files, attention_md = attention_section(jobs, out, notes)
    report.files += attention_files
    report.markdown = markdown(title, jobs, summary, paired, notes, attention_md)  # last, so it lists every note
    report.files.append(atomic_write_text(out / "results.md", report.markdown))
    return report


class ReportCallback(Callback):
    """Builds the sweep report when a Hydra multirun ends. A report error is logged, never raised: the
    runs are done and their files stay; rebuild with ``python -m laffi_exp.report SWEEP_DIR``.

    Hydra's basic sweeper stops at the first failed job and then skips ``on_multirun_end``; jobs that
    are missing metrics for other reasons (killed, still running elsewhere) are logged as missing.
    """

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = None
        try:
            sweep_dir = Path(config.hydra.sweep.dir)
            report = build_report(sweep_dir, self.out_dir)
        except Exception:
            log.exception(
                "Sweep report FAILED for %s (the runs themselves are unaffected); "
                "retry with: python -m laffi_exp.report %s", sweep_dir, sweep_dir
            )
            return
        log.info(
            "Sweep report: %d job(s), %d without metrics; wrote %s",
            len(report.jobs), len(report.missing), ", ".join(str(p) for p in report.files),
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m laffi_exp.report",
        description="Tables, figure and paired comparisons for a Hydra sweep of laffi_exp runs.",
    )
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", type=Path, help="The sweep dir (hydra.sweep.dir).")
    parser.add_argument("--out", metavar="DIR", type=Path, help="Where to write the report (default: SWEEP_DIR).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        report = build_report(args.sweep_dir, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.markdown, end="")
    print("\nwrote: " + ", ".join(str(p) for p in report.files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
