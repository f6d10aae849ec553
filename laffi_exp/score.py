"""Command line SQuAD 2.0 scorer: same arguments and output as the official evaluate-v2.0.py.

python -m laffi_exp.score DATA.json PREDS.json [--na-prob-file NA.json] [--na-prob-thresh 1.0]
                          [--out-file OUT.json] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from laffi_exp.core.io import atomic_write_text
from laffi_exp.scoring.squad_metrics import golds_from_dataset, score_examples

# How many missing ids to name on stderr without --verbose.
_SHOWN_MISSING = 5


class InputError(Exception):
    """A bad input file; the message names the file and what was expected."""


def _load_json(path: str, expected: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found; expected {expected}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); expected {expected}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; expected {expected}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}); expected {expected}") from None


def load_golds(path: str) -> dict[str, list[str]]:
    expected = "a SQuAD JSON object with a 'data' list of articles"
    obj = _load_json(path, expected)
    if not isinstance(obj, dict) or "data" not in obj:
        raise InputError(f"{path}: no 'data' key; expected {expected}")
    try:
        golds = golds_from_dataset(obj["data"])
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    if not golds:
        raise InputError(f"{path}: no questions found; expected {expected}")
    return golds


def load_preds(path: str) -> dict[str, str]:
    expected = 'a JSON object mapping each question id to an answer string ("" = no answer)'
    obj = _load_json(path, expected)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: top level is a JSON {type(obj).__name__}; expected {expected}")
    for qid, answer in obj.items():
        if not isinstance(answer, str):
            raise InputError(f"{path}: value for {qid!r} is {type(answer).__name__}; expected {expected}")
    return obj


def load_na_probs(path: str) -> dict[str, float]:
    expected = "a JSON object mapping each question id to a no-answer probability (a number)"
    obj = _load_json(path, expected)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: top level is a JSON {type(obj).__name__}; expected {expected}")
    for qid, prob in obj.items():
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or math.isnan(prob):
            raise InputError(f"{path}: value for {qid!r} is {json.dumps(prob)}; expected {expected}")
    return obj


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m laffi_exp.score",
        description="SQuAD 2.0 scorer; numbers and output identical to the official evaluate-v2.0.py.",
    )
    parser.add_argument("data_file", metavar="DATA.json", help="SQuAD 2.0 data file (e.g. dev-v2.0.json).")
    parser.add_argument("pred_file", metavar="PREDS.json", help='Predictions: {question id: answer, "" = no answer}.')
    parser.add_argument("--out-file", "-o", metavar="OUT.json", help="Write the metrics here instead of stdout.")
    parser.add_argument(
        "--na-prob-file", "-n", metavar="NA.json", help="{question id: probability of no answer}; adds best_* keys."
    )
    parser.add_argument(
        "--na-prob-thresh",
        "-t",
        type=float,
        default=1.0,
        help='Predict "" where the no-answer probability exceeds this (default: 1.0).',
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="List every missing id and count ignored predictions."
    )
    return parser


def _report_missing(golds: dict[str, list[str]], preds: dict[str, str], verbose: bool) -> None:
    missing = [qid for qid in golds if qid not in preds]
    if missing:
        head = f"warning: {len(missing)} of {len(golds)} questions have no prediction (scored as wrong)"
        if verbose:
            print(head + ":\n" + "\n".join(missing), file=sys.stderr)
        else:
            more = ", ..." if len(missing) > _SHOWN_MISSING else ""
            print(f"{head}: {', '.join(missing[:_SHOWN_MISSING])}{more}", file=sys.stderr)
    if verbose:
        extra = sum(1 for qid in preds if qid not in golds)
        if extra:
            print(f"note: {extra} predictions for ids not in the data file were ignored", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        golds = load_golds(args.data_file)
        preds = load_preds(args.pred_file)
        na_probs = load_na_probs(args.na_prob_file) if args.na_prob_file else None
        try:
            result = score_examples(golds, preds, na_probs, args.na_prob_thresh)
        except ValueError as e:  # only raised for no-answer probabilities that are missing
            raise InputError(f"{args.na_prob_file}: {e}") from None
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _report_missing(golds, preds, args.verbose)
    if args.out_file:
        # The official script writes compact JSON (json.dump defaults) with no trailing newline.
        try:
            atomic_write_text(Path(args.out_file), json.dumps(result))
        except OSError as e:
            print(f"error: {args.out_file}: cannot write ({e.strerror or e})", file=sys.stderr)
            return 2
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
