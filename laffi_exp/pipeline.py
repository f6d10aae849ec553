"""One experiment run, start to end: set up, the four stages, write, report. ``run(cfg)`` is what the CLI
and the tests call.

1. Answer prediction (``stages.answer``): the base model answers the training and validation questions.
2. Feedback annotation (``stages.annotate``): hybrid feedback on those answers, human and synthetic.
3. LoRA fine-tuning (``stages.train``): predict that feedback (laffi) or the gold answer (sft).
4. Evaluation (``stages.evaluate``): SQuAD 2.0 scores of the base and the fine-tuned model.

Stages 1 and 2 run only for a method that trains on feedback (``method.trains_on_feedback``). Stage
outputs that cost model time (generations, trained adapters) go through a content-addressed cache
(``stages.cache``) keyed by exactly their inputs, so the jobs of a sweep share them: stage 1 runs once
for every ratio and seed, SFT trains once per seed, the base is evaluated once. A run dir that already
holds a finished run of the same config is not run again (``runs.sweep``).

Launched as several processes (``torchrun`` or ``srun``, with ``trainer=ddp|ddp_cpu|fsdp``), every
rank runs this same program: each generates its share of every batch of prompts and all gather the
results, Lightning's DDP or FSDP trains, and rank 0 alone annotates, writes files, logs and touches
the cache (``laffi_exp.distributed``).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from laffi_exp import distributed
from laffi_exp.attention import run_dir as attention
from laffi_exp.core.config import validate, write_resolved_config
from laffi_exp.core.io import write_json
from laffi_exp.distributed.launch import join_ranks
from laffi_exp.runs import loggers as run_loggers
from laffi_exp.runs import sweep
from laffi_exp.stages import annotate, answer, evaluate, train
from laffi_exp.stages.annotate import Annotated
from laffi_exp.stages.setup import setup


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the flat metrics dict (also written to ``metrics.json``)."""
    started = time.time()
    validate(cfg)
    out = Path(cfg.paths.output_dir)
    join_ranks(cfg, in_sweep=sweep.sweep_dir() is not None)
    done = distributed.on_main(sweep.finished_metrics, cfg, out)  # a finished cell of a re-run sweep: nothing to do
    if done is not None:
        if distributed.is_main():
            attention.after_run(cfg, out)  # analysis.attention=true: a finished cell gets the analysis it lacks
        return done
    with sweep.claim(out) if distributed.is_main() else contextlib.nullcontext():  # one job per folder
        return _run(cfg, out, started)


def _run(cfg: DictConfig, out: Path, started: float) -> dict[str, Any]:
    s = setup(cfg)
    main = distributed.is_main()  # the one rank that writes files and has loggers
    if main:
        write_resolved_config(cfg, out / "config.yaml")
        sweep.mark(cfg, out, "running")
    loggers = run_loggers.instantiate_loggers(cfg) if main else {}
    try:
        annotated = Annotated(feedback={}, metrics={})
        if cfg.method.trains_on_feedback:
            answers = answer.predict(s)  # 1. the base model's answers to annotate
            annotated = distributed.on_main(annotate.annotate, s, answers)  # 2. feedback on them
        trained = train.fine_tune(s, annotated.feedback, loggers)  # 3. LoRA
        evaluated = evaluate.evaluate(s, trained)  # 4. held-out SQuAD 2.0 scores
        metrics = {
            **s.metrics,
            **annotated.metrics,
            **trained.metrics,
            **evaluated.metrics,
            "time/seconds": round(time.time() - started, 1),
        }
        metrics = distributed.from_main(metrics)  # rank 0's: it alone annotated
        if main:
            write_json(out / "metrics.json", metrics)
            run_loggers.log_results(
                loggers, metrics, annotated.summary, s.splits["test"], evaluated, cfg.evaluation.num_samples_logged
            )
    except BaseException:
        if main:
            run_loggers.finish_loggers(loggers, failed=True)
            sweep.mark(cfg, out, "failed", stages=s.cache.events)
        raise
    if main:
        run_loggers.finish_loggers(loggers, failed=False)
        sweep.mark(cfg, out, "finished", stages=s.cache.events, seconds=metrics["time/seconds"])
        run_loggers.print_summary(metrics, out)
        attention.after_run(cfg, out, trained.model, s.tokenizer, s.prompter)  # analysis.attention=true
    return metrics
