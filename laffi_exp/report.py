"""Command line: the report of a finished (or partly finished) sweep.

    python -m laffi_exp.report SWEEP_DIR [--out DIR]

The report itself (tables, figure, paired comparisons) is built by :mod:`laffi_exp.runs.report`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from laffi_exp.core.errors import ConfigError
from laffi_exp.runs.report import build_report


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
