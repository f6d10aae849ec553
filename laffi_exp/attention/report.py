"""The attention analysis as files: ``summary.csv`` (every layer, head, model and measure: mean and 95% CI
over prompts), ``paired.csv`` (fine-tuned − base per prompt, bootstrap CIs), ``summary.md``,
``analysis.json`` and the plots of ``laffi_exp.attention.plots``; and, for a sweep, the headline measures
of every job aggregated over seeds per method and human share (``sweep_rows``, ``sweep_markdown``).

CIs in ``summary.csv``: mean ± t(0.975, n−1)·std/√n over the prompts (n: the prompts where the measure
is defined). In ``paired.csv`` and ``summary.md`` the difference fine-tuned − base is taken per prompt
and its 95% CI is a percentile bootstrap over prompts (``laffi_exp.scoring.stats.bootstrap_ci``: 2000
resamples, fixed seed). "mean" in the layer or head column is the mean over the analysed layers or over
the heads of a layer, taken per prompt before the statistics.
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from laffi_exp.attention.analysis import MODELS, Analysis
from laffi_exp.attention.measures import MEASURES, SCOPES
from laffi_exp.attention.segments import PROMPTS

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["prompt", "scope", "layer", "head", "model", "measure", "n", "mean", "ci_low", "ci_high"]
PAIRED_COLUMNS = ["prompt", "scope", "layer", "measure", "n", "base", "fine_tuned", "diff", "ci_low", "ci_high"]
# The measures a sweep report compares across methods and human shares.
HEADLINE = ("local", "far", "distance", "entropy", "sink", "gold")
SCOPE_LABELS = {"all": "all positions", "gen": "first generated"}
MODEL_LABELS = {"base": "base", "fine_tuned": "fine-tuned", "delta": "fine-tuned − base"}


# -- statistics -----------------------------------------------------------------------------------
def _nanmean(x: np.ndarray, axis) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: an undefined measure stays NaN
        return np.nanmean(x, axis=axis)


def t_interval(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n, mean and 95% CI (low, high) along axis 0, NaNs left out: mean ± t(0.975, n−1)·s/√n (no
    interval for n < 2)."""
    from laffi_exp.scoring.stats import t_quantile_975

    n = np.sum(~np.isnan(x), axis=0)
    mean = _nanmean(x, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        std = np.nanstd(x, axis=0, ddof=1)
    t = np.vectorize(lambda k: t_quantile_975(int(k) - 1) if k >= 2 else np.nan, otypes=[float])(n) if n.size else n
    half = np.where(n >= 2, t * std / np.sqrt(np.maximum(n, 1)), np.nan)
    return n, mean, mean - half, mean + half


def per_layer(values: np.ndarray) -> np.ndarray:
    """(prompts, layers, scopes, measures, heads) -> (prompts, layers, scopes, measures): mean over heads."""
    return _nanmean(values, -1)


def overall(values: np.ndarray) -> np.ndarray:
    """(prompts, layers, scopes, measures, heads) -> (prompts, scopes, measures): mean over layers and heads."""
    return _nanmean(per_layer(values), 1)


def paired_bootstrap(a: np.ndarray, b: np.ndarray) -> tuple[int, float, float, float, float, float]:
    """n, mean a, mean b, mean a − b and its 95% CI (percentile bootstrap over prompts) on the prompts
    where both are defined."""
    from laffi_exp.scoring.stats import bootstrap_ci

    ok = ~(np.isnan(a) | np.isnan(b))
    if not ok.any():
        return 0, np.nan, np.nan, np.nan, np.nan, np.nan
    diff = (a - b)[ok]
    low, high = bootstrap_ci(diff[:, None], np.ones(len(diff)))
    return int(ok.sum()), float(a[ok].mean()), float(b[ok].mean()), float(diff.mean()), float(low[0]), float(high[0])


# -- rows -----------------------------------------------------------------------------------------
def _blocks(values: np.ndarray, layers: Sequence[int]) -> Iterator[tuple[Any, Any, np.ndarray]]:
    """(layer, head, per-prompt values (prompts, scopes, measures)): every layer x head, every layer's
    mean over heads, and the mean over layers and heads."""
    by_layer = per_layer(values)
    for k, layer in enumerate(layers):
        for h in range(values.shape[-1]):
            yield layer, h, values[:, k, :, :, h]
        yield layer, "mean", by_layer[:, k]
    yield "mean", "mean", _nanmean(by_layer, 1)


def fmt(x: float) -> str:
    return "" if x is None or np.isnan(x) else f"{x:.6g}"


def summary_rows(analysis: Analysis) -> Iterator[list[Any]]:
    """``summary.csv``: per prompt, scope, layer, head, model (base, fine_tuned, delta: per prompt) and
    measure, the n prompts where it is defined, the mean and its 95% CI (Student t)."""
    for kind in PROMPTS:
        base, tuned = analysis.values[(kind, "base")], analysis.values[(kind, "fine_tuned")]
        for (layer, head, b), (_, _, f) in zip(_blocks(base, analysis.layers), _blocks(tuned, analysis.layers)):
            for model, x in (("base", b), ("fine_tuned", f), ("delta", f - b)):
                n, mean, low, high = t_interval(x)
                for s, scope in enumerate(SCOPES):
                    for m, measure in enumerate(MEASURES):
                        if n[s, m]:
                            yield [
                                kind,
                                scope,
                                layer,
                                head,
                                model,
                                measure,
                                int(n[s, m]),
                                fmt(mean[s, m]),
                                fmt(low[s, m]),
                                fmt(high[s, m]),
                            ]


def paired_rows(analysis: Analysis) -> list[dict[str, Any]]:
    """``paired.csv``: fine-tuned − base per prompt, every measure, per layer (mean over heads) and over
    all analysed layers, with the bootstrap CI."""
    rows = []
    for kind in PROMPTS:
        base, tuned = per_layer(analysis.values[(kind, "base")]), per_layer(analysis.values[(kind, "fine_tuned")])
        cells = [(layer, base[:, k], tuned[:, k]) for k, layer in enumerate(analysis.layers)]
        cells.append(("mean", _nanmean(base, 1), _nanmean(tuned, 1)))
        for layer, b, f in cells:
            for s, scope in enumerate(SCOPES):
                for m, measure in enumerate(MEASURES):
                    n, mean_f, mean_b, diff, low, high = paired_bootstrap(f[:, s, m], b[:, s, m])
                    if n:
                        rows.append(
                            dict(
                                prompt=kind,
                                scope=scope,
                                layer=layer,
                                measure=measure,
                                n=n,
                                base=mean_b,
                                fine_tuned=mean_f,
                                diff=diff,
                                ci_low=low,
                                ci_high=high,
                            )
                        )
    return rows


def csv_text(columns: Sequence[str], rows: Iterator[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


# -- markdown -------------------------------------------------------------------------------------
def _value(measure: str, x: float, signed: bool = False) -> str:
    if x is None or np.isnan(x):
        return ""
    digits = 2 if measure == "distance" else 3
    if signed and x != 0 and abs(x) < 0.5 * 10**-digits:  # a difference too small for the fixed digits
        return f"{x:+.1e}"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def markdown(analysis: Analysis, paired: Sequence[dict[str, Any]]) -> str:
    """``summary.md``: the setting, then per prompt the mean over layers and heads of every measure, base
    and fine-tuned ± 95% CI, and the paired difference with its bootstrap CI."""
    o = analysis.options
    n, k = len(analysis.ids), sum(analysis.answerable)
    layers = "all" if o.layers is None else ", ".join(map(str, analysis.layers))
    lines = [
        f"# Attention analysis: {analysis.run_dir.name}",
        "",
        (
            f"{analysis.method} run on {analysis.model_name}: {n} held-out prompts ({k} answerable, seed {o.seed}), "
            f"layers {layers} of the model ({len(analysis.layers)} analysed x {analysis.heads} heads), local window "
            f"w = {o.window}, far threshold T = {o.far} tokens. Eager attention. base: the same model with the "
            "adapter disabled; both read the same tokens (the feedback prompt shows the fine-tuned model's prediction)."
        ),
    ]
    means = {}
    for kind in PROMPTS:
        for name in MODELS:
            stats = t_interval(overall(analysis.values[(kind, name)]))
            means[(kind, name)] = stats
    for kind in PROMPTS:
        lines += [
            "",
            f"## {kind.capitalize()} prompt",
            "",
            "| measure | positions | base | fine-tuned | fine-tuned − base [95% CI] | n |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for m, measure in enumerate(MEASURES):
            for s, scope in enumerate(SCOPES):
                row = next(
                    (
                        r
                        for r in paired
                        if r["prompt"] == kind
                        and r["layer"] == "mean"
                        and r["scope"] == scope
                        and r["measure"] == measure
                    ),
                    None,
                )
                if row is None:
                    continue
                cells = []
                for name in MODELS:
                    _, mean, low, high = means[(kind, name)]
                    half = (high[s, m] - low[s, m]) / 2
                    cells.append(f"{_value(measure, mean[s, m])} ± {_value(measure, half)}")
                diff = (
                    f"{_value(measure, row['diff'], True)} [{_value(measure, row['ci_low'], True)}, "
                    f"{_value(measure, row['ci_high'], True)}]"
                )
                lines.append(f"| {measure} | {SCOPE_LABELS[scope]} | {cells[0]} | {cells[1]} | {diff} | {row['n']} |")
    lines += [
        "",
        "Mean over the analysed layers and heads, per prompt; base and fine-tuned: mean over prompts ± 95% CI "
        "half-width (Student t); the difference: per prompt, percentile bootstrap over prompts. Masses are shares "
        "of a query's attention (0-1), distance is in tokens, entropy in nats. Definitions: README, \"Attention "
        'analysis". Per layer: `layers.png`, `paired.csv`; per head: `heads_delta.png`, `summary.csv`'
        + "".join(f"; example: `example_{safe_name(analysis.ids[i])}.png`" for i in analysis.example_indices)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# -- sweeps ---------------------------------------------------------------------------------------
def read_summary(path: Path) -> dict[tuple[str, str, str, str], float]:
    """(prompt, scope, model, measure) -> mean, over layers and heads, from one job's ``summary.csv``."""
    found = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["layer"] == "mean" and row["head"] == "mean" and row["mean"] != "":
                found[(row["prompt"], row["scope"], row["model"], row["measure"])] = float(row["mean"])
    return found


SWEEP_MODELS = ("base", "fine_tuned", "delta")
SWEEP_COLUMNS = [
    "method",
    "human_ratio",
    "prompt",
    "scope",
    "measure",
    "n",
    "seeds",
    "base_mean",
    "fine_tuned_mean",
    "fine_tuned_ci95",
    "delta_mean",
    "delta_ci95",
]


def sweep_rows(jobs: Sequence[Any], notes: list[str] | None = None) -> list[dict[str, Any]]:
    """``attention.csv``: per method, human share, prompt, scope and headline measure, over seeds: the
    base value, the fine-tuned value and fine-tuned − base (mean, 95% CI half-width, Student t over seeds;
    a seed's several runs are averaged). ``jobs`` are ``laffi_exp.runs.report.Job``; those without
    ``attention/summary.csv`` are left out (named in ``notes`` when some jobs have one)."""
    from laffi_exp.scoring.stats import mean_std_ci

    found = [(job, job.path / "attention" / "summary.csv") for job in jobs if job.metrics is not None]
    present = [(job, path) for job, path in found if path.is_file()]
    if not present:
        return []
    lacking = [job.name for job, path in found if not path.is_file()]
    if lacking:
        message = f"attention: {len(lacking)} job(s) without attention/summary.csv: {', '.join(lacking)}"
        log.warning(message)
        if notes is not None:
            notes.append(message)
    series: dict[tuple, dict[int, list[dict]]] = {}
    for job, path in present:
        if job.method is None or job.seed is None:
            continue
        values = read_summary(path)
        for kind in PROMPTS:
            for scope in SCOPES:
                for measure in HEADLINE:
                    got = {model: values.get((kind, scope, model, measure)) for model in SWEEP_MODELS}
                    if got["delta"] is not None:
                        key = (job.method, job.human_ratio, kind, scope, measure)
                        series.setdefault(key, {}).setdefault(job.seed, []).append(got)
    rows = []
    order = {"sft": 0, "laffi": 1}

    def position(key: tuple) -> tuple:
        method, ratio, kind, scope, measure = key
        return (
            order.get(method, 2),
            method,
            -1.0 if ratio is None else ratio,
            PROMPTS.index(kind),
            SCOPES.index(scope),
            HEADLINE.index(measure),
        )

    for key in sorted(series, key=position):
        by_seed = series[key]
        per_seed = {
            s: {m: float(np.mean([g[m] for g in got if g[m] is not None])) for m in SWEEP_MODELS}
            for s, got in sorted(by_seed.items())
        }
        base, _, _ = mean_std_ci([v["base"] for v in per_seed.values()])
        tuned, _, tuned_ci = mean_std_ci([v["fine_tuned"] for v in per_seed.values()])
        delta, _, delta_ci = mean_std_ci([v["delta"] for v in per_seed.values()])
        method, ratio, kind, scope, measure = key
        rows.append(
            dict(
                method=method,
                human_ratio=ratio,
                prompt=kind,
                scope=scope,
                measure=measure,
                n=len(per_seed),
                seeds=" ".join(map(str, per_seed)),
                base_mean=base,
                fine_tuned_mean=tuned,
                fine_tuned_ci95=tuned_ci,
                delta_mean=delta,
                delta_ci95=delta_ci,
            )
        )
    return rows


def sweep_csv(rows: Sequence[dict[str, Any]]) -> str:
    return csv_text(SWEEP_COLUMNS, ([r[c] for c in SWEEP_COLUMNS] for r in rows))


def sweep_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The ``results.md`` section: one row per method, human share, prompt and positions; one column per
    headline measure, fine-tuned − base as mean over seeds ± 95% CI half-width."""
    if not rows:
        return ""
    lines = [
        "",
        "## Attention: fine-tuned − base",
        "",
        "| method | human share | prompt | positions | " + " | ".join(f"Δ {m}" for m in HEADLINE) + " | n |",
        "|---|---:|---|---|" + "---:|" * (len(HEADLINE) + 1),
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["human_ratio"], r["prompt"], r["scope"]), {})[r["measure"]] = r
    for (method, ratio, kind, scope), by_measure in groups.items():
        cells = []
        for measure in HEADLINE:
            r = by_measure.get(measure)
            if r is None or r["delta_mean"] is None:
                cells.append("")
                continue
            ci = f" ± {_value(measure, r['delta_ci95'])}" if r["delta_ci95"] is not None else ""
            cells.append(_value(measure, r["delta_mean"], True) + ci)
        n = max(r["n"] for r in by_measure.values())
        share = "—" if ratio is None else f"{ratio * 100:g}%"
        lines.append(f"| {method} | {share} | {kind} | {SCOPE_LABELS[scope]} | " + " | ".join(cells) + f" | {n} |")
    lines += [
        "",
        (
            "Each job's `attention/summary.csv` (mean over layers, heads and its held-out prompts); mean over "
            "seeds ± 95% CI half-width (Student t), n = seeds. Base and fine-tuned values: `attention.csv`."
        ),
    ]
    return "\n".join(lines) + "\n"
