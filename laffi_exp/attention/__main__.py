"""``python -m laffi_exp.attention RUN_DIR [--num N] [--layers ...]``: the attention analysis of one finished
run, written to ``RUN_DIR/attention/`` (see the README, "Attention analysis")."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from laffi_exp.core.args import ArgumentParser
from laffi_exp.core.errors import ConfigError

_LAYER = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")


def parse_layers(items: Sequence[str]) -> tuple[int, ...]:
    """``0,2 5-7 -1`` -> (0, 2, 5, 6, 7, -1): numbers and ranges, by commas or spaces; negative counts
    from the last layer."""
    layers: list[int] = []
    for part in (p for item in items for p in item.split(",") if p.strip()):
        match = _LAYER.match(part.strip())
        if not match:
            raise ConfigError(f"--layers: expected layer numbers or ranges such as 0,2 5-7 -1, got {part!r}")
        first, last = int(match.group(1)), int(match.group(2) if match.group(2) is not None else match.group(1))
        if last < first:
            raise ConfigError(f"--layers: the range {part!r} is empty")
        layers.extend(range(first, last + 1))
    if not layers:
        raise ConfigError("--layers: no layer given")
    return tuple(layers)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m laffi_exp.attention",
        description="Where fine-tuning moved the model's attention: base (adapter disabled) vs fine-tuned on a "
        "finished run's held-out prompts. Writes RUN_DIR/attention/. Defaults: the run's analysis.attention_* keys.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", type=Path, help="a finished run dir (outputs/laffi/runs/<time>, a sweep cell)"
    )
    p.add_argument("--num", type=int, help="held-out prompts to analyse, a fixed seeded subset (default 128)")
    p.add_argument("--layers", nargs="+", metavar="L", help="layers to analyse, e.g. 0,2 5-7 -1 (default: all)")
    p.add_argument("--window", type=int, help="local window w: keys at distance < w (default 8)")
    p.add_argument("--far", type=int, help="far threshold T: keys at distance > T (default 32)")
    p.add_argument("--seed", type=int, help="seed of the prompt subset (default 0)")
    p.add_argument("--batch-size", type=int, help="prompts per forward pass (default 8)")
    p.add_argument("--examples", type=int, help="prompts drawn as example_<id>.png (default 1)")
    p.add_argument("--device", help="auto (a GPU when there is one), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--out", type=Path, metavar="DIR", help="where to write (default RUN_DIR/attention)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf

    from laffi_exp.attention.analysis import check_run_dir, options_from_config
    from laffi_exp.attention.run_dir import analyze_run_dir

    try:
        layers = parse_layers(args.layers) if args.layers is not None else None
        check_run_dir(args.run_dir)
        options = options_from_config(
            OmegaConf.load(args.run_dir / "config.yaml"),
            num=args.num,
            window=args.window,
            far=args.far,
            layers=layers,
            seed=args.seed,
            batch_size=args.batch_size,
            examples=args.examples,
            device=args.device,
        )
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # loading bars would bury the summary and any one-line error
        _, files = analyze_run_dir(args.run_dir, options, args.out)
    except InstantiationException as err:  # the run's model source refused its arguments
        cause = err.__cause__
        text = str(cause) if isinstance(cause, ConfigError) else str(err).strip().splitlines()[0]
        print(f"error: {text}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = next((f for f in files if f.name == "summary.md"), None)
    if summary is not None:
        print(summary.read_text(encoding="utf-8"), end="")
    print("\nwrote: " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
