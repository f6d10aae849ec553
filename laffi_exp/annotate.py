"""Stage 2, feedback annotation: natural-language feedback on each predicted answer, from a hybrid of
two annotator pools. ``feedback.human_ratio`` picks which examples go to the human pool, by a hash of
(seed, example id): the human set at a lower ratio is a subset of the set at a higher one. For a share
of those (``feedback.overlap_ratio``, nested the same way) the synthetic pool annotates too, so that the
feedback report can compare the pools on the same answers; that feedback is never trained on.

The human pool is a simulated human or a file of feedback written by people (``laffi_exp.human``);
``python -m laffi_exp.annotate export`` writes the batch of answers for them to annotate.

Offline stand-ins for the two pools:
- ``SimulatedHuman`` (annotator ``simulated_human``): an accurate verdict, the right answer when the
  prediction is wrong, a short reason quoting the passage, varied phrasing.
- ``RuleBasedAnnotator`` (annotator ``rule_based``): fixed phrasing with an error model standing in for
  an imperfect LLM annotator: a wrong verdict at ``wrong_verdict_rate``, no correction at
  ``missing_correction_rate``.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from laffi_exp.config import CONF_DIR, validate
from laffi_exp.errors import ConfigError
from laffi_exp.hashing import unit_hash
from laffi_exp.prompts import parse_feedback
from laffi_exp.records import Answer, Feedback, QAExample
from laffi_exp.squad_metrics import compute_exact

log = logging.getLogger(__name__)


def is_correct(ex: QAExample, prediction: str) -> bool:
    """SQuAD exact match against any gold answer ("" against an unanswerable question)."""
    return any(compute_exact(g, prediction) for g in (ex.answers or ("",)))


def evidence(ex: QAExample) -> str:
    """The sentence of the passage that holds the first gold answer."""
    if not ex.answers:
        return ""
    start = ex.answer_starts[0] if ex.answer_starts else max(ex.context.find(ex.answers[0]), 0)
    cut = ex.context.rfind(". ", 0, start)
    left = cut + 2 if cut >= 0 else 0
    right = ex.context.find(". ", start + len(ex.answers[0]))
    return ex.context[left : right + 1 if right >= 0 else len(ex.context)].strip()


class Annotator(Protocol):
    """Gives natural-language feedback on one predicted answer.

    Optional, used by ``annotate`` where an annotator has them: ``annotate_many(items)`` (the texts
    for many (example, prediction) pairs at once), ``prepare(shots)`` (before a synthetic batch, the
    run's human (example, prediction, feedback) items, e.g. as few-shot examples),
    ``check_against(examples, answers, human_ids)`` (a human file: which ids fall back to synthetic)
    and ``annotator_for(example_id)`` (a per-example annotator name).
    """

    name: str
    source: str  # "human" or "synthetic"

    def annotate(self, ex: QAExample, prediction: str) -> str: ...


class SimulatedHuman:
    """A careful human: always the right verdict and, when wrong, the right answer and why."""

    source = "human"

    def __init__(self, seed: int = 0, name: str = "simulated_human"):
        self.seed = seed
        self.name = name

    def annotate(self, ex: QAExample, prediction: str) -> str:
        style = int(unit_hash(self.seed, "style", ex.id) * 3)
        said = f"\"{prediction}\"" if prediction else "no answer"
        why = evidence(ex)
        if is_correct(ex, prediction):
            if ex.is_impossible:
                return (
                    "Correct. The passage does not say this, so there is no answer.",
                    "That's right: nothing in the passage answers the question.",
                    "Yes, this question cannot be answered from the passage.",
                )[style]
            return (
                f"Correct. The passage says: \"{why}\"",
                f"That's right: {said} is what the passage gives.",
                f"Yes, {said} is correct, since the passage says \"{why}\"",
            )[style]
        if ex.is_impossible:
            return (
                f"Incorrect. The passage never says this, so the question cannot be answered; {said} is a guess.",
                f"Wrong: {said} does not answer the question. The passage has no answer.",
                "Not quite: the passage does not give this, so the question cannot be answered.",
            )[style]
        return (
            f"Incorrect. The answer is \"{ex.gold}\" because the passage says \"{why}\"",
            f"Not quite: the passage says \"{why}\" so the answer should be \"{ex.gold}\".",
            f"Wrong: {said} is not what the question asks for; the answer is \"{ex.gold}\".",
        )[style]


class RuleBasedAnnotator:
    """A template annotator with an error model, standing in for an LLM annotator offline."""

    source = "synthetic"

    def __init__(
        self,
        wrong_verdict_rate: float = 0.1,
        missing_correction_rate: float = 0.2,
        seed: int = 0,
        name: str = "rule_based",
    ):
        for key, rate in (("wrong_verdict_rate", wrong_verdict_rate), ("missing_correction_rate", missing_correction_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"feedback.synthetic.{key}: expected a rate in [0, 1], got {rate}")
        self.wrong_verdict_rate = wrong_verdict_rate
        self.missing_correction_rate = missing_correction_rate
        self.seed = seed
        self.name = name

    def annotate(self, ex: QAExample, prediction: str) -> str:
        correct = is_correct(ex, prediction)
        if unit_hash(self.seed, "verdict", ex.id) < self.wrong_verdict_rate:
            correct = not correct  # the annotator misjudges this one
            if correct:
                return "Correct. The answer is supported by the passage."
            return "Incorrect. The answer is not supported by the passage."
        if correct:
            return "Correct. The answer is supported by the passage."
        if unit_hash(self.seed, "correction", ex.id) < self.missing_correction_rate:
            return "Incorrect. The answer is not supported by the passage."
        if ex.is_impossible:
            return "Incorrect. The question cannot be answered from the passage."
        return f"Incorrect. The answer is \"{ex.gold}\"."


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
    fallback: set[str] = set()
    if hasattr(human, "check_against"):
        fallback = set(human.check_against(examples, answers, chosen).fallback)
    by_human = [(ex, predictions[ex.id]) for ex in examples if ex.id in chosen and ex.id not in fallback]
    human_fb = {f.id: f for f in _annotate_all(human, by_human)}
    both = overlap_ids(list(human_fb), overlap_ratio, seed)
    by_synthetic = [(ex, predictions[ex.id]) for ex in examples if ex.id not in human_fb or ex.id in both]
    synthetic_fb = {}
    if by_synthetic:
        if hasattr(synthetic, "prepare"):
            # Not the overlap: a shot of the very answer it judges would flatter the pools' agreement.
            synthetic.prepare([(ex, pred, human_fb[ex.id].feedback) for ex, pred in by_human if ex.id not in both])
        synthetic_fb = {f.id: f for f in _annotate_all(synthetic, by_synthetic)}
    feedback = [human_fb[ex.id] if ex.id in human_fb else synthetic_fb[ex.id] for ex in examples]
    overlap = [(human_fb[ex.id], synthetic_fb[ex.id]) for ex in examples if ex.id in both]
    log.info(
        "Feedback: %d human (%.1f%%, ratio %.2f), %d synthetic, %d fell back from human to synthetic, %d overlap",
        len(human_fb), 100 * len(human_fb) / max(len(examples), 1), human_ratio, len(examples) - len(human_fb), len(fallback), len(overlap),
    )
    return Annotation(feedback=feedback, overlap=overlap, fallback=len(fallback))


def _annotate_all(annotator: Annotator, items: list[tuple[QAExample, str]]) -> list[Feedback]:
    """Feedback records for (example, prediction) items: in one call where the annotator batches."""
    if not items:
        return []
    if hasattr(annotator, "annotate_many"):
        texts = annotator.annotate_many(items)
    else:
        texts = [annotator.annotate(ex, prediction) for ex, prediction in items]
    if len(texts) != len(items):
        raise RuntimeError(f"annotator {annotator.name}: {len(texts)} feedback texts for {len(items)} answers")
    out = []
    for (ex, prediction), text in zip(items, texts):
        text = _clean(text)
        verdict, correction = parse_feedback(text)
        name = annotator.annotator_for(ex.id) if hasattr(annotator, "annotator_for") else annotator.name
        out.append(Feedback(ex.id, ex.question, prediction, text, annotator.source, name, verdict, correction))
    return out


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m laffi_exp.annotate export [--out PREFIX] [--ids FILE] [--include-gold] [--force]
    [overrides...]``: the run's stage-1 answers for people to annotate, as JSONL and CSV. ``serve`` and
    ``export-db``: the annotation app over such a batch (``laffi_exp.annotation_app.cli``)."""
    parser = _Parser(
        prog="python -m laffi_exp.annotate",
        description="Export predicted answers for human annotation; fill in `feedback`, then run with "
        "feedback.human.path=FILE.",
    )
    parser.add_argument(
        "command", choices=["export", "serve", "export-db"],
        help="export: write the run's answers to annotate; serve BATCH: annotate them in the browser; "
        "export-db: the browser's annotations as a human feedback file (see `COMMAND --help`)",
    )
    parser.add_argument("--out", default="human_feedback", help="output prefix: writes PREFIX.jsonl and PREFIX.csv")
    parser.add_argument("--ids", type=Path, help="a file of example ids, one per line (default: those the ratio gives to humans)")
    parser.add_argument("--include-gold", action="store_true", help="add a `gold` column (off: annotators judge unprompted)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run, e.g. feedback.human_ratio=0.3")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.error("expected a command: export, serve or export-db")
    if argv[0] in ("serve", "export-db"):  # the annotation app: imported here alone, a plain run never loads it
        from laffi_exp.annotation_app.cli import main as app_main

        return app_main(argv)
    opts = parser.parse_intermixed_args(argv)
    try:
        jsonl_path, csv_path, count = export(opts.overrides, opts.out, opts.ids, opts.include_gold, opts.force)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except (HydraException, OmegaConfBaseException) as err:  # a bad override or config value
        print(f"error: config: {str(err).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {count} answers to annotate: {jsonl_path} and {csv_path}")
    print("fill in `feedback` (and `annotator_id`) in either, then run with feedback.human.path=<that file>")
    return 0


def export(overrides: Sequence[str], out: str, ids_file: Path | None, include_gold: bool, force: bool) -> tuple[Path, Path, int]:
    """Compose the run's config, predict its stage-1 answers and export the chosen examples."""
    from laffi_exp import pipeline  # heavy (torch), and it imports this module
    from laffi_exp.human import batch_paths, export_batch  # it imports this module

    # Outside a Hydra run there is no run dir for stage 1's files: a default one, which the user's
    # overrides may replace (the last value of a key wins).
    run_dir = "paths.output_dir=outputs/${task_name}/exports/${now:%Y-%m-%d_%H-%M-%S}"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[run_dir, *overrides])
    validate(cfg)
    batch_paths(out, overwrite=force)  # refuse before the answers are predicted, not after
    if ids_file is not None:
        if not ids_file.is_file():
            raise ConfigError(f"--ids: no such file {ids_file}")
        lines = ids_file.read_text(encoding="utf-8").splitlines()
        ids = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not ids:
            raise ConfigError(f"--ids: {ids_file} lists no ids (one per line)")
    splits, answers = pipeline.stage1_answers(cfg)
    examples = [*splits["train"], *splits["validation"]]
    if ids_file is None:
        ids = sorted(human_ids_by_split([splits["train"], splits["validation"]], cfg.feedback.human_ratio, cfg.seed))
        if not ids:
            raise ConfigError(f"feedback.human_ratio={cfg.feedback.human_ratio} gives no example to humans: raise it or pass --ids FILE")
    jsonl_path, csv_path = export_batch(
        examples,
        [*answers["train"], *answers["validation"]],
        ids,
        out,
        include_gold=include_gold,
        no_answer_text=cfg.prompt.no_answer_text,
        overwrite=force,
    )
    return jsonl_path, csv_path, len(set(ids))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every other command-line error here
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


if __name__ == "__main__":
    raise SystemExit(main())
