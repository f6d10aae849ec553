"""The app's commands, ``python -m laffi_exp.annotate serve BATCH`` and ``export-db``; the web stack is
imported by ``serve`` alone."""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from laffi_exp.annotation_app.batch import read_batch
from laffi_exp.annotation_app.export import CHOICES, REPORT_NAME, export_db
from laffi_exp.annotation_app.store import Store
from laffi_exp.core.args import ArgumentParser  # one line and exit code 2 for a bad command line, as `export` has
from laffi_exp.core.errors import ConfigError
from laffi_exp.core.prompts import NO_ANSWER_TEXT

PROG = "python -m laffi_exp.annotate"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535] (0: any free one), got {text!r}")
    return int(text)


def serve_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=f"{PROG} serve", description="Annotate an exported batch in the browser (one item per screen)."
    )
    parser.add_argument("batch", type=Path, help="the .jsonl that `export` wrote")
    parser.add_argument("--db", type=Path, help="the SQLite store (default: BATCH.annotations.sqlite beside the batch)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8765, help="port (default 8765; 0: any free one)")
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-local --host; every request then needs the printed token",
    )
    parser.add_argument(
        "--per-item", type=_positive, help="annotators per item, for agreement (default 1, or what the db has)"
    )
    parser.add_argument("--chunk", type=_positive, default=20, help="items an annotator claims at a time (default 20)")
    parser.add_argument(
        "--no-answer-text", default=NO_ANSWER_TEXT, help=f"how the batch writes no answer (default {NO_ANSWER_TEXT!r})"
    )
    return parser


def export_db_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=f"{PROG} export-db",
        description="Write the store's feedback as the file feedback.human.path reads, "
        "and annotation_report.json beside it.",
    )
    parser.add_argument("--db", type=Path, required=True, help="the SQLite store `serve` wrote")
    parser.add_argument("--out", type=Path, required=True, help="the human feedback file to write (.jsonl)")
    parser.add_argument(
        "--choose",
        choices=CHOICES,
        default="majority",
        help="with several annotators per item: majority (the most common verdict, default), first (the first "
        "saved), all (every one as its own row: for analysis, feedback.human.path takes one row per id)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the file against the run the overrides compose, as feedback.human.path does (stale, missing)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="with --check: Hydra overrides of the run, e.g. feedback.human_ratio=0.3"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """``serve`` or ``export-db``: bad input is one line on stderr and exit code 2."""
    command, rest = argv[0], list(argv[1:])
    try:
        if command == "serve":
            return serve(serve_parser().parse_args(rest))
        return export(export_db_parser().parse_intermixed_args(rest))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def serve(opts: argparse.Namespace) -> int:
    try:
        import uvicorn

        from laffi_exp.annotation_app.server import create_app, is_local
    except ImportError as err:
        raise ConfigError(f"serve needs the app extra ({err.name} is not installed): pip install -e '.[app]'") from None
    local = is_local(opts.host)
    if not local and not opts.allow_remote:
        raise ConfigError(
            f"--host {opts.host}: not a local address; pass --allow-remote to serve on it "
            "(every request then needs the printed token)"
        )
    batch = read_batch(opts.batch)
    db = opts.db or batch.path.with_name(batch.path.stem + ".annotations.sqlite")
    store = Store.for_batch(db, batch, per_item=opts.per_item, no_answer_text=opts.no_answer_text)
    token = None if local else secrets.token_urlsafe(24)
    sock = _listen(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(
        f"annotating {batch.path} ({len(batch.items)} items, {store.per_item} annotator(s) per item); "
        f"every save is in {store.path}"
    )
    if token:
        print(f"token: {token} (every request must carry it; the URL below sets it in the browser)")
        url += f"?token={token}"
    print(f"open {url}   (Ctrl+C stops the server)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(store, chunk=opts.chunk, token=token), log_level="warning"))
    server.run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that --port 0 gets a free port whose number is printed before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)  # connections wait in the backlog from now on, before the server's loop runs
    except OSError as err:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None
    return sock


def export(opts: argparse.Namespace) -> int:
    if opts.overrides and not opts.check:
        raise ConfigError(
            f"export-db: overrides ({' '.join(opts.overrides)}) are for --check: add --check, or drop them"
        )
    store = Store.existing(opts.db)
    rows, report = export_db(store, opts.out, opts.choose, opts.force)
    coverage = report["coverage"]
    print(
        f"wrote {len(rows)} rows ({opts.choose}) to {opts.out} and {opts.out.with_name(REPORT_NAME)}: "
        f"{coverage['annotated']} of {report['items']} items annotated, {coverage['missing']} without feedback"
    )
    if opts.choose == "all" and len(rows) > coverage["annotated"]:
        print(
            "note: several rows per id; feedback.human.path takes one row per id: "
            "use --choose majority or first for a run"
        )
    if opts.check:
        try:
            print(check_against_run(opts.out, opts.overrides))
        except ConfigError as err:
            raise ConfigError(f"--check: {err} ({opts.out} is written all the same)") from None
    return 0


def check_against_run(path: Path, overrides: Sequence[str]) -> str:
    """Check a human feedback file against the run the overrides compose, exactly as the run would
    (stage 1's answers come from the stage cache); the summary, or ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    from laffi_exp.core.config import CONF_DIR, validate
    from laffi_exp.feedback.hybrid import human_ids_by_split
    from laffi_exp.stages.answer import stage1_answers

    run_dir = "paths.output_dir=outputs/${task_name}/exports/${now:%Y-%m-%d_%H-%M-%S}"  # as `export` does
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[run_dir, *overrides, "feedback/human=file", f"feedback.human.path={path.resolve()}"],
            )
        validate(cfg)
        pool = instantiate(cfg.feedback.human)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"config: {str(err).strip().splitlines()[0]}") from None
    pool.check()
    splits, answers = stage1_answers(cfg)
    examples = [*splits["train"], *splits["validation"]]
    chosen = human_ids_by_split([splits["train"], splits["validation"]], cfg.feedback.human_ratio, cfg.seed)
    check = pool.check_against(examples, [*answers["train"], *answers["validation"]], chosen)
    return "check: " + check.summary()
