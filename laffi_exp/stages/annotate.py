"""Stage 2, feedback annotation: hybrid feedback on the base model's answers (``feedback.hybrid``: the
human pool for ``feedback.human_ratio`` of the examples, the synthetic pool for the rest), written to
the run dir with ``feedback_report.json``, which says how good each pool is. Rank 0 alone runs it in a
distributed run (an LLM annotator costs, a response cache is written)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from laffi_exp.core.io import write_json, write_jsonl
from laffi_exp.core.records import Answer, Feedback
from laffi_exp.feedback import hybrid
from laffi_exp.feedback.report import feedback_report, numbers
from laffi_exp.scoring.squad_metrics import is_correct
from laffi_exp.stages.setup import Setup

log = logging.getLogger(__name__)

SPLITS = {"train": "", "validation": "val_"}  # the prefix of each split's files


@dataclass
class Annotated:
    """What stage 2 gives the later stages."""

    feedback: dict[str, list[Feedback]]  # per split, one per example, in example order: what trains
    metrics: dict[str, Any]  # -> metrics.json
    summary: dict[str, Any] = field(default_factory=dict)  # -> the wandb summary only (the feedback report)


def annotate(s: Setup, answers: dict[str, list[Answer]]) -> Annotated:
    """Feedback on every training and validation answer; the files and the feedback report."""
    cfg, human, synthetic = s.cfg, s.human, s.synthetic
    examples = s.splits["train"] + s.splits["validation"]
    chosen = hybrid.human_ids_by_split([s.splits["train"], s.splits["validation"]], cfg.feedback.human_ratio, cfg.seed)
    check = human.check_against(examples, answers["train"] + answers["validation"], chosen)
    human_time = None
    if check is not None:  # a file of human feedback: stale or missing rows are refused here
        (log.warning if check.unknown else log.info)(check.summary())
        human_time = human.time_report(check.used)  # rows with `seconds`
    feedback, report, fallback = {}, {}, 0
    for split, prefix in SPLITS.items():
        result = hybrid.annotate(
            s.splits[split],
            answers[split],
            human,
            synthetic,
            cfg.feedback.human_ratio,
            cfg.seed,
            overlap_ratio=cfg.feedback.overlap_ratio,
        )
        feedback[split], fallback = result.feedback, fallback + result.fallback
        write_jsonl(s.out / f"{prefix}feedback.jsonl", result.feedback)
        if result.overlap:
            write_jsonl(
                s.out / f"{prefix}overlap_feedback.jsonl",
                [{"human": dataclasses.asdict(h), "synthetic": dataclasses.asdict(y)} for h, y in result.overlap],
            )
        report[split] = feedback_report(s.splits[split], result.feedback, result.overlap)
    if human_time:
        report["human_time"] = human_time  # time per human-annotated example used, train and validation
    write_json(s.out / "feedback_report.json", report)
    train = feedback["train"]
    metrics = {
        "feedback/human_share": sum(f.source == "human" for f in train) / len(train),
        "feedback/human_fallback": fallback,
        "feedback/base_correct_share": sum(is_correct(ex, f.prediction) for ex, f in zip(s.splits["train"], train))
        / len(train),
    }
    return Annotated(feedback, metrics, numbers(report["train"], prefix="feedback_report"))
