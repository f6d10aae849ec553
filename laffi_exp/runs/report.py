"""The sweep report: tables, a figure and paired comparisons for a Hydra multirun of the pipeline,
built by ``python -m laffi_exp.report SWEEP_DIR [--out DIR]`` or at the end of every sweep through
:class:`ReportCallback` (``hydra.callbacks``). Each job dir under
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
:mod:`laffi_exp.scoring.squad_metrics`; a missing prediction scores 0) and the estimate is the mean per-question
difference A − B. Its 95% CI is a percentile bootstrap over test questions (2000 resamples, fixed
seed, the same resampled questions for EM and F1). The pooled row averages over every (seed,
question) pair and resamples question ids, all seeds' differences on one question together: a
question's difficulty is shared across seeds. Seeds are not resampled, so the CI says how much the
difference depends on the questions drawn, for these trained models.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from laffi_exp.core.errors import ConfigError
from laffi_exp.core.io import atomic_savefig, atomic_write_text
from laffi_exp.runs.jobs import Job, label, load_jobs, note
from laffi_exp.runs.paired import PAIRED_COLUMNS, paired_differences
from laffi_exp.scoring.stats import BOOTSTRAP_SEED, RESAMPLES, mean_std_ci

log = logging.getLogger(__name__)

# SQuAD 2.0 metrics summarised over seeds, named as in metrics.json after the "<prefix>/" (best_*: with na_probs).
METRICS = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1")
# Protocol -> metrics.json prefix of the fine-tuned model's scores (see laffi_exp.stages.evaluate).
PROTOCOLS = {"direct": "test", "reflect": "test_reflect"}
RESULTS_LEAD = ["job", "method", "human_ratio", "seed", "status", "time/seconds"]
SUMMARY_LEAD = ["method", "human_ratio", "protocol", "n", "seeds"]
_ORDER = {"base": 0, "sft": 1, "laffi": 2}


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
            note(notes, f"job {job.name}: method or seed unknown; left out of the summary")
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
            averaged = {
                m: float(np.mean([v[m] for v in values if m in v])) for m in METRICS if any(m in v for v in values)
            }
            differ = any(abs(v[m] - averaged[m]) > 1e-9 for v in values for m in v)
            if len(values) > 1 and (key[0] != "base" or differ):
                names = ", ".join(name for name, _ in named)
                what = "runs with different numbers" if key[0] == "base" else "runs"
                note(notes, f"{label(*key)}: seed {seed} has {len(values)} {what} ({names}); their mean is used")
            result[key][seed] = averaged
    return result


def _series_order(method: str, ratio: float | None, protocol: str) -> tuple:
    return (_ORDER.get(method, len(_ORDER)), method, -1.0 if ratio is None else ratio, list(PROTOCOLS).index(protocol))


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
                note(
                    notes,
                    f"{label(method, ratio, protocol)}: {metric} reported by {len(values)} of {len(by_seed)} seeds",
                )
            row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_ci95"] = mean_std_ci(values)
        rows.append(row)
    return rows


def summary_columns() -> list[str]:
    return SUMMARY_LEAD + [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "ci95")]


# --- Figure -------------------------------------------------------------------------------------


def plot_ablation(summary: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """EM and F1 against the human share: LaFFi (direct, reflect) with 95% CI error bars, SFT and base
    as horizontal lines with their CI band. Returns None (nothing written) when nothing can be drawn."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state inside a Hydra callback

    panels = [
        (m, y) for m, y in (("exact", "EM (%)"), ("f1", "F1 (%)")) if any(r[f"{m}_mean"] is not None for r in summary)
    ]
    if not panels:
        return None
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    # (method, protocol, label, colour, x offset): the two protocols share x values, so they are drawn
    # one point apart to keep both error bars visible.
    lines = [("laffi", "direct", "LaFFi (direct)", "C0", -1.0), ("laffi", "reflect", "LaFFi (reflect)", "C1", 1.0)]
    references = [("sft", "SFT", "C2"), ("base", "base (untrained)", "C7")]
    for ax, (metric, ylabel) in zip(axes, panels):
        for method, protocol, legend, color, offset in lines:
            points = sorted(
                (r["human_ratio"] * 100 + offset, r[f"{metric}_mean"], r[f"{metric}_ci95"] or 0.0)
                for r in summary
                if r["method"] == method
                and r["protocol"] == protocol
                and r["human_ratio"] is not None
                and r[f"{metric}_mean"] is not None
            )
            if points:
                x, y, err = zip(*points)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=color, label=legend)
        for method, legend, color in references:
            row = next((r for r in summary if r["method"] == method and r["protocol"] == "direct"), None)
            if row is None or row[f"{metric}_mean"] is None:
                continue
            mean, ci = row[f"{metric}_mean"], row[f"{metric}_ci95"]
            ax.axhline(mean, linestyle="--", color=color, label=f"{legend}, n={row['n']}")
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


def markdown(
    title: str,
    jobs: Sequence[Job],
    summary: Sequence[dict],
    paired: Sequence[dict],
    notes: Sequence[str],
    attention: str = "",
) -> str:
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
    lines += [
        "",
        (
            "EM and F1 in %: mean over seeds ± 95% CI half-width (Student t); n = seeds. "
            "base is the untrained model, scored in every run on the same test questions."
        ),
    ]
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
                f"| {_SYSTEM_LABELS[r['system_a']]} − {_SYSTEM_LABELS[r['system_b']]} | {_share(r['human_ratio'])} "
                f"| {r['n_seeds']} | {r['n_questions']} "
                f"| {r['exact_diff']:+.1f} [{r['exact_ci_low']:+.1f}, {r['exact_ci_high']:+.1f}] "
                f"| {r['f1_diff']:+.1f} [{r['f1_ci_low']:+.1f}, {r['f1_ci_high']:+.1f}] |"
            )
        lines += [
            "",
            (
                "Per question, pooled over seeds; CI: percentile bootstrap over test questions "
                f"({RESAMPLES} resamples). Per seed: paired.csv."
            ),
        ]
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
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    resamples: int = RESAMPLES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
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
        note(notes, f"{len(missing)} job(s) without metrics.json (crashed or still running): {', '.join(missing)}")

    summary = summarize(jobs, notes)
    paired = paired_differences(jobs, resamples, bootstrap_seed, notes)
    title = f"Sweep {'/'.join(sweep_dir.resolve().parts[-2:])}"

    out.mkdir(parents=True, exist_ok=True)
    report = Report(sweep_dir, out, jobs, summary, paired, markdown="", notes=notes)
    report.files.append(atomic_write_text(out / "results.csv", _csv_text(*results_table(jobs))))
    columns = summary_columns()
    report.files.append(
        atomic_write_text(out / "summary.csv", _csv_text(columns, ([r[c] for c in columns] for r in summary)))
    )
    if paired:
        report.files.append(
            atomic_write_text(
                out / "paired.csv", _csv_text(PAIRED_COLUMNS, ([r[c] for c in PAIRED_COLUMNS] for r in paired))
            )
        )
    try:
        figure = plot_ablation(summary, out / "ablation.png", title)
    except ImportError as err:  # matplotlib is optional for the tables
        figure = None
        note(notes, f"ablation.png not drawn: {err}")
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
                "retry with: python -m laffi_exp.report %s",
                sweep_dir,
                sweep_dir,
            )
            return
        log.info(
            "Sweep report: %d job(s), %d without metrics; wrote %s",
            len(report.jobs),
            len(report.missing),
            ", ".join(str(p) for p in report.files),
        )
