"""A content-addressed cache of stage outputs, shared by every run and sweep job on one machine.

An entry is a folder ``<root>/<stage>/<key>/`` where ``key`` hashes exactly the inputs that determine
the stage's output (the ``spec``: model fingerprint, the prompts themselves, generation or training
settings). A changed setting changes the key of the stages it feeds and no other. Entries are built
in a private temp folder and renamed into place, under a file lock per entry, so parallel jobs never
see a half-written entry and never compute one entry twice: the second job waits, then reads. In a
distributed run rank 0 alone reads, locks and writes entries (``get_or_compute``).
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

from laffi_exp import distributed
from laffi_exp.io import write_json

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def key(spec: Any) -> str:
    """The short content key of a spec (a cache entry's folder name, a model's identity)."""
    return fingerprint(spec)[:20]


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
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return {"path": str(root.resolve()), "files": [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def weights_fingerprint(path: str | None, cache_dir: str | None = None) -> dict | None:
    """What identifies the loaded weights: the model folder's files, or for a hub id the local snapshot
    folder it was loaded from (its path names the commit)."""
    if not path:
        return None
    if not Path(path).is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the local cache: the id alone
            return {"hub_id": path}
    return folder_fingerprint(path)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_versions() -> dict[str, str]:
    """The code that computes stage outputs: this package and the libraries whose upgrade may change
    a generation or a trained adapter. Part of every stage key."""
    import peft
    import pytorch_lightning
    import torch
    import transformers

    import laffi_exp

    return {
        "laffi_exp": laffi_exp.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "pytorch_lightning": pytorch_lightning.__version__,
    }


class StageCache:
    """``get_or_build(stage, spec, build)``: the entry folder for ``spec``, built by ``build(tmp_dir)``
    the first time; ``get_or_compute`` (what the pipeline uses) returns the computed or stored result and
    also serves distributed runs. ``enabled=False`` reads nothing: ``get_or_compute`` computes and stores
    nothing, ``get_or_build`` builds into a throw-away folder under ``root/_scratch``."""

    def __init__(self, root: str | Path, enabled: bool = True, lock_timeout_s: float = 6 * 3600):
        self.root = Path(root).expanduser()
        self.enabled = enabled
        self.lock_timeout_s = lock_timeout_s
        self.events: dict[str, dict] = {}  # stage -> {"key", "hit", "seconds"}: what this run did

    def key(self, spec: Any) -> str:
        return key(spec)

    def entry(self, stage: str, spec: Any) -> Path:
        return self.root / stage / self.key(spec)

    def lookup(self, stage: str, spec: Any) -> Path | None:
        """The complete entry for ``spec``, or None (always None when disabled)."""
        entry = self.entry(stage, spec)
        return entry if self.enabled and (entry / SPEC_FILE).is_file() else None

    def lock(self, stage: str, spec: Any) -> FileLock:
        """The entry's lock: whoever holds it is the one job that may build the entry."""
        entry = self.entry(stage, spec)
        entry.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(entry) + ".lock", timeout=self.lock_timeout_s)

    def store(self, stage: str, spec: Any, build: Callable[[Path], None]) -> Path:
        """Build the entry in a private temp folder and rename it into place (hold ``lock`` first)."""
        entry = self.entry(stage, spec)
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            write_json(tmp / SPEC_FILE, spec)  # written last: marks the entry complete
            if (entry / SPEC_FILE).is_file():  # complete already (a file system without working locks)
                shutil.rmtree(tmp, ignore_errors=True)
                return entry
            shutil.rmtree(entry, ignore_errors=True)  # a stale partial entry (no spec.json)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return entry

    def _throwaway(self, stage: str, spec: Any, build: Callable[[Path], None]) -> Path:
        target = self.root / "_scratch" / f"{stage}-{self.key(spec)}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        build(target)
        return target

    def _event(self, label: str, spec: Any, hit: bool, started: float) -> None:
        self.events[label] = {"key": self.key(spec), "hit": hit, "cached": self.enabled, "seconds": round(time.time() - started, 2)}

    def get_or_build(
        self, stage: str, spec: Any, build: Callable[[Path], None], label: str | None = None
    ) -> Path:
        """``label`` names the event in ``self.events`` (default: the stage)."""
        started = time.time()
        if not self.enabled:
            target = self._throwaway(stage, spec, build)
            self._event(label or stage, spec, False, started)
            return target
        entry, hit = self.lookup(stage, spec), True
        if entry is None:
            with self.lock(stage, spec):
                entry = self.lookup(stage, spec)  # another job may have built it while we waited
                if entry is None:
                    hit, entry = False, self.store(stage, spec, build)
        log.info("Stage cache %s: %s %s", stage, "hit" if hit else "built", entry)
        self._event(label or stage, spec, hit, started)
        return entry

    def get_or_compute(
        self,
        stage: str,
        spec: Any,
        compute: Callable[[], Any],
        write: Callable[[Path, Any], None],
        read: Callable[[Path], Any],
        label: str | None = None,
    ) -> Any:
        """``get_or_build`` for work that every rank of a distributed run does together (generation
        shards, a DDP ``fit``); every rank calls it. Returns ``compute()`` (run by every rank) or, on
        a hit, ``read(entry)``. Rank 0 alone touches the cache: it holds the entry's lock, decides hit
        or miss and tells the others, reads a hit, and writes a miss with ``write(folder, result)``.
        In a single process this is ``get_or_build`` with ``build = write(folder, compute())``. A
        disabled cache computes and writes nothing."""
        if not self.enabled:
            started = time.time()
            result = compute()
            self._event(label or stage, spec, False, started)
            return result
        if distributed.world_size() == 1:
            computed = []

            def build(folder: Path) -> None:
                computed.append(compute())
                write(folder, computed[0])

            entry = self.get_or_build(stage, spec, build, label)
            return computed[0] if computed else read(entry)
        started = time.time()
        lock = self.lock(stage, spec) if distributed.is_main() else None

        def claim() -> Path | None:
            if lock is not None:
                lock.acquire()  # meanwhile the other ranks wait for rank 0's answer
            return self.lookup(stage, spec)

        try:
            entry = distributed.on_main(claim)
            hit = entry is not None
            if hit:
                result = distributed.on_main(read, entry)
            else:
                result = compute()

                def build(folder: Path) -> None:
                    write(folder, result)

                if distributed.is_main():
                    entry = self.store(stage, spec, build)
        finally:
            if lock is not None and lock.is_locked:
                lock.release()
        if distributed.is_main():
            log.info("Stage cache %s: %s %s", stage, "hit" if hit else "built", entry)
        self._event(label or stage, spec, hit, started)
        return result
