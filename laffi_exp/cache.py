"""A content-addressed cache of stage outputs, shared by every run and sweep job on one machine.

An entry is a folder ``<root>/<stage>/<key>/`` where ``key`` hashes exactly the inputs that determine
the stage's output (the ``spec``: model fingerprint, the prompts themselves, generation or training
settings). A changed setting changes the key of the stages it feeds and no other. Entries are built
in a private temp folder and renamed into place, under a file lock per entry, so parallel jobs never
see a half-written entry and never compute one entry twice: the second job waits, then reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from laffi_exp.io import write_json

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def text_digest(texts) -> str:
    """One hash of a sequence of strings (prompts, targets), order included."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()


def folder_fingerprint(path: str | Path) -> dict:
    """What identifies a model folder cheaply: each file's name, size and modification time (a hub
    snapshot folder also names its commit). Content hashing would cost minutes for a 7B model."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {"path": str(root.resolve()), "files": [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


class StageCache:
    """``get_or_build(stage, spec, build)``: the entry folder for ``spec``, built by ``build(tmp_dir)``
    the first time. ``enabled=False`` builds every time into a throw-away folder (nothing is read or
    written under ``root``)."""

    def __init__(self, root: str | Path, enabled: bool = True, lock_timeout_s: float = 6 * 3600):
        self.root = Path(root).expanduser()
        self.enabled = enabled
        self.lock_timeout_s = lock_timeout_s
        self.events: dict[str, dict] = {}  # stage -> {"key", "hit", "seconds"}: what this run did

    def key(self, spec: Any) -> str:
        return fingerprint(spec)[:20]

    def entry(self, stage: str, spec: Any) -> Path:
        return self.root / stage / self.key(spec)

    def get_or_build(
        self, stage: str, spec: Any, build: Callable[[Path], None], label: str | None = None, scratch: Path | None = None
    ) -> Path:
        """``label`` names the event in ``self.events`` (default: the stage)."""
        label = label or stage
        key = self.key(spec)
        started = time.time()
        if not self.enabled:
            target = Path(scratch or self.root / "_scratch") / f"{stage}-{key}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            build(target)
            self.events[label] = {"key": key, "hit": False, "cached": False, "seconds": round(time.time() - started, 2)}
            return target
        entry = self.root / stage / key
        entry.parent.mkdir(parents=True, exist_ok=True)
        hit = True
        if not (entry / SPEC_FILE).is_file():
            with FileLock(str(entry) + ".lock", timeout=self.lock_timeout_s):
                if not (entry / SPEC_FILE).is_file():  # another job may have built it while we waited
                    hit = False
                    tmp = entry.with_name(f".{key}.tmp-{os.getpid()}")
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir()
                    try:
                        build(tmp)
                        write_json(tmp / SPEC_FILE, spec)  # written last: marks the entry complete
                        shutil.rmtree(entry, ignore_errors=True)  # a stale partial entry (no spec.json)
                        os.replace(tmp, entry)
                    except BaseException:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise
        log.info("Stage cache %s: %s %s", stage, "hit" if hit else "built", entry)
        self.events[label] = {"key": key, "hit": hit, "cached": True, "seconds": round(time.time() - started, 2)}
        return entry
