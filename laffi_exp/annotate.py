"""Command line: the run's stage-1 answers for people to annotate, and the annotation app.

    python -m laffi_exp.annotate export [--out PREFIX] [--ids FILE] [--include-gold] [--force] [overrides...]
    python -m laffi_exp.annotate serve BATCH ...      # the annotation app (laffi_exp.annotation_app)
    python -m laffi_exp.annotate export-db DB ...

Fill in ``feedback`` in the exported JSONL or CSV, then run with ``feedback/human=file feedback.human.path=FILE``
(``laffi_exp.feedback.human`` reads it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from laffi_exp.core.args import ArgumentParser
from laffi_exp.core.config import CONF_DIR, validate
from laffi_exp.core.errors import ConfigError
from laffi_exp.feedback.hybrid import human_ids_by_split


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m laffi_exp.annotate export [--out PREFIX] [--ids FILE] [--include-gold] [--force]
    [overrides...]``: the run's stage-1 answers for people to annotate, as JSONL and CSV. ``serve`` and
    ``export-db``: the annotation app over such a batch (``laffi_exp.annotation_app.cli``)."""
    parser = ArgumentParser(
        prog="python -m laffi_exp.annotate",
        description="Export predicted answers for human annotation; fill in `feedback`, then run with "
        "feedback/human=file feedback.human.path=FILE.",
    )
    parser.add_argument(
        "command",
        choices=["export", "serve", "export-db"],
        help="export: write the run's answers to annotate; serve BATCH: annotate them in the browser; "
        "export-db: the browser's annotations as a human feedback file (see `COMMAND --help`)",
    )
    parser.add_argument("--out", default="human_feedback", help="output prefix: writes PREFIX.jsonl and PREFIX.csv")
    parser.add_argument(
        "--ids", type=Path, help="a file of example ids, one per line (default: those the ratio gives to humans)"
    )
    parser.add_argument(
        "--include-gold", action="store_true", help="add a `gold` column (off: annotators judge unprompted)"
    )
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
    print(
        "fill in `feedback` (and `annotator_id`) in either, "
        "then run with feedback/human=file feedback.human.path=<that file>"
    )
    return 0


def export(
    overrides: Sequence[str], out: str, ids_file: Path | None, include_gold: bool, force: bool
) -> tuple[Path, Path, int]:
    """Compose the run's config, predict its stage-1 answers and export the chosen examples."""
    from laffi_exp.feedback.human import batch_paths, export_batch
    from laffi_exp.stages.answer import stage1_answers  # heavy (torch): not for --help or a bad command line

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
    splits, answers = stage1_answers(cfg)
    examples = [*splits["train"], *splits["validation"]]
    if ids_file is None:
        ids = sorted(human_ids_by_split([splits["train"], splits["validation"]], cfg.feedback.human_ratio, cfg.seed))
        if not ids:
            raise ConfigError(
                f"feedback.human_ratio={cfg.feedback.human_ratio} gives no example to humans: "
                "raise it or pass --ids FILE"
            )
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


if __name__ == "__main__":
    raise SystemExit(main())
