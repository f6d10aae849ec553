"""Cells of a sweep: a fingerprint of each run's config, a manifest per run dir and per sweep dir, and
the rule that makes re-running a finished sweep cheap and safe.

A run dir whose ``manifest.json`` says ``finished`` with the same config fingerprint is not run again
(its metrics are returned). One that finished with a *different* config is refused (the default,
``cache.on_changed=error``), or with ``cache.on_changed=rerun`` its old artifacts are moved aside
into ``replaced-<time>/`` and the cell runs again: results of two configs never mix in one folder.
In a Hydra multirun each job also records its cell in ``<sweep dir>/manifest.json`` (under a lock).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from laffi_exp.core.config import NO_RESULT_GROUPS, NO_RESULT_LEAVES, TRANSPORT_KEYS, flatten
from laffi_exp.core.errors import ConfigError
from laffi_exp.core.hashing import code_versions, file_digest, fingerprint, folder_fingerprint
from laffi_exp.core.io import read_json, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def result_config(cfg: DictConfig) -> dict:
    """The resolved config without the keys that cannot change a result (output places, loggers, bars)."""
    container = OmegaConf.to_container(cfg, resolve=True)

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in NO_RESULT_LEAVES}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    config = strip({k: v for k, v in container.items() if k not in NO_RESULT_GROUPS})
    for dotted in TRANSPORT_KEYS:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def input_files(config: dict) -> dict[str, Any]:
    """The contents behind every path in the config (a human feedback file, a data file or folder, a
    model folder): a finished run of the same config but edited inputs is not the same run."""
    found: dict[str, Any] = {}
    for key, value in flatten(config).items():
        if isinstance(value, str) and value and ("/" in value or "." in value) and len(value) < 4096:
            path = Path(value).expanduser()
            try:
                if path.is_file():
                    found[key] = file_digest(path)
                elif path.is_dir():
                    found[key] = folder_fingerprint(path)
            except OSError:
                continue
    return found


def run_identity(cfg: DictConfig) -> dict:
    """What a run's result depends on: its config, the contents of its input files, the code versions."""
    config = result_config(cfg)
    return {"config": config, "inputs": input_files(config), "code": code_versions()}


def finished_metrics(cfg: DictConfig, out: Path) -> dict | None:
    """The metrics of a finished run of this same config in ``out``, or None when it must run."""
    path = out / MANIFEST
    if not (path.is_file() and (out / "metrics.json").is_file()):
        return None
    manifest = read_json(path)
    if manifest.get("status") != "finished":
        return None
    current = run_identity(cfg)
    if manifest.get("fingerprint") == fingerprint(current):
        log.info("%s already holds a finished run of this config: skipping it (delete the folder to run it again)", out)
        _record_in_sweep(cfg, out, manifest)
        return read_json(out / "metrics.json")
    old, new = flatten(manifest.get("config", {})), flatten(current["config"])
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    changed += [
        f"the contents of {k}"
        for k in sorted(current["inputs"])
        if manifest.get("inputs", {}).get(k) != current["inputs"][k]
    ]
    changed += [
        f"the {k} version" for k in sorted(current["code"]) if manifest.get("code", {}).get(k) != current["code"][k]
    ]
    shown = ", ".join(
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" if k in old.keys() | new.keys() else k for k in changed[:5]
    ) + (" ..." if len(changed) > 5 else "")
    if cfg.cache.on_changed != "rerun":
        raise ConfigError(
            f"{out} holds a finished run with a different config ({shown}); results of two configs are never "
            "mixed in one folder: use another output dir (e.g. hydra.sweep.dir=...), or cache.on_changed=rerun to "
            "move the old artifacts aside and run again"
        )
    aside = out / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for item in out.iterdir():
        if item != aside and item.name != ".hydra" and not item.name.startswith("replaced-") and item.suffix != ".log":
            shutil.move(str(item), aside / item.name)
    log.warning(
        "%s held a run with a different config (%s): moved its artifacts to %s and running again", out, shown, aside
    )
    return None


@contextmanager
def claim(out: Path) -> Iterator[None]:
    """Hold ``out`` for this run: a second job given the same folder (e.g. a sweep whose cell names
    leave out a swept key) stops at once instead of writing into the first one's files."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / ".run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(
            f"{out}: another job is running in this folder; give each cell its own folder (e.g. name every swept "
            "key in hydra.sweep.subdir)"
        ) from None
    try:
        yield
    finally:
        lock.release()


def mark(cfg: DictConfig, out: Path, status: str, **extra: Any) -> None:
    """Write the run's manifest (status, config fingerprint, stage cache events) and its sweep cell."""
    identity = run_identity(cfg)
    fp = fingerprint(identity)
    path = out / MANIFEST
    manifest = read_json(path) if path.is_file() else {}
    if manifest.get("fingerprint") != fp:
        manifest = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    manifest.update(status=status, fingerprint=fp, **identity, **extra)
    if status != "running":
        manifest["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(path, manifest)
    _record_in_sweep(cfg, out, manifest)


def sweep_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not inside a Hydra job
        return None
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def _record_in_sweep(cfg: DictConfig, out: Path, manifest: dict) -> None:
    folder = sweep_dir()
    if folder is None:
        return
    try:
        cell = str(out.resolve().relative_to(folder.resolve()))
    except ValueError:
        cell = str(out)
    path = folder / MANIFEST
    with FileLock(str(path) + ".lock", timeout=600):
        cells = read_json(path)["cells"] if path.is_file() else {}
        cells[cell] = {k: manifest.get(k) for k in ("status", "fingerprint", "started", "ended", "seconds")}
        cells[cell].update(method=cfg.method.name, human_ratio=cfg.feedback.human_ratio, seed=cfg.seed)
        write_json(path, {"cells": dict(sorted(cells.items()))})
