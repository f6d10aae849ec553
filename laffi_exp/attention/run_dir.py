"""The attention analysis of a finished run dir, end to end: load the run's models, measure, write
``RUN_DIR/attention/`` (``python -m laffi_exp.attention RUN_DIR``, or ``analysis.attention=true`` at the end
of a run)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from laffi_exp.attention import plots
from laffi_exp.attention.analysis import (
    OUT_DIR,
    Analysis,
    Options,
    analyze,
    check_run_dir,
    load_run,
    options_from_config,
)
from laffi_exp.attention.report import (
    PAIRED_COLUMNS,
    SUMMARY_COLUMNS,
    csv_text,
    fmt,
    markdown,
    paired_rows,
    summary_rows,
)
from laffi_exp.core.io import atomic_write_text, read_json, write_json
from laffi_exp.core.prompts import Prompter

log = logging.getLogger(__name__)


def analyze_run_dir(
    run_dir: str | Path,
    options: Options | None = None,
    out_dir: str | Path | None = None,
    loaded: tuple[Any, Any, Prompter] | None = None,
) -> tuple[Analysis, list[Path]]:
    """The whole analysis of one finished run dir; writes ``RUN_DIR/attention/`` (or ``out_dir``) and
    returns the analysis and the files written. ``options`` default to the run's ``analysis`` keys."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    if options is None:
        options = options_from_config(OmegaConf.load(run_dir / "config.yaml"))
    run = load_run(run_dir, options.device, loaded)
    analysis = analyze(run, options)
    files = write_outputs(analysis, Path(out_dir) if out_dir is not None else run_dir / OUT_DIR)
    log.info(
        "Attention analysis of %s: %d prompts in %.0f s; wrote %s",
        run_dir,
        len(analysis.ids),
        analysis.seconds,
        ", ".join(p.name for p in files),
    )
    return analysis, files


def is_current(run_dir: Path, options: Options) -> bool:
    """Whether ``RUN_DIR/attention/`` already holds an analysis with these options."""
    recorded = run_dir / OUT_DIR / "analysis.json"
    if not (recorded.is_file() and (run_dir / OUT_DIR / "summary.csv").is_file()):
        return False
    return read_json(recorded).get("options") == options.recorded()


def after_run(cfg: DictConfig, out: Path, model=None, tokenizer=None, prompter: Prompter | None = None) -> None:
    """``analysis.attention=true``: analyse the finished run in ``out`` (with the run's own model when
    given). A finished sweep cell run again gets the analysis it lacks; one that has it is left alone."""
    if not OmegaConf.select(cfg, "analysis.attention", default=False):
        return
    options = options_from_config(cfg)
    if model is None and is_current(out, options):
        log.info("%s already holds its attention analysis", out / OUT_DIR)
        return
    loaded = (model, tokenizer, prompter) if model is not None else None
    analyze_run_dir(out, options, loaded=loaded)


def write_outputs(analysis: Analysis, out: Path) -> list[Path]:
    """Every file of ``RUN_DIR/attention/``, each written atomically; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = [atomic_write_text(out / "summary.csv", csv_text(SUMMARY_COLUMNS, summary_rows(analysis)))]
    paired = paired_rows(analysis)
    paired_cells = ([fmt(r[c]) if isinstance(r[c], float) else r[c] for c in PAIRED_COLUMNS] for r in paired)
    files.append(atomic_write_text(out / "paired.csv", csv_text(PAIRED_COLUMNS, paired_cells)))
    files.append(atomic_write_text(out / "summary.md", markdown(analysis, paired)))
    files.append(
        write_json(
            out / "analysis.json",
            {
                "run_dir": str(analysis.run_dir),
                "method": analysis.method,
                "model": analysis.model_name,
                "options": analysis.options.recorded(),
                "layers": analysis.layers,
                "heads": analysis.heads,
                "prompts": len(analysis.ids),
                "answerable": sum(analysis.answerable),
                "ids": analysis.ids,
                "examples": [analysis.ids[i] for i in analysis.example_indices],
                "attn_implementation": "eager",
                "seconds": analysis.seconds,
            },
        )
    )
    files += plots.write_plots(analysis, out)
    return files
