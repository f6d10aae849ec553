"""A content-addressed cache of stage outputs, shared by every run and sweep job on one machine.

An entry is a folder ``<root>/<stage>/<key>/`` where ``key`` hashes exactly the inputs that determine
the stage's output (the ``spec``: model fingerprint, the prompts themselves, generation or training
settings). A changed setting changes the key of the stages it feeds and no other. Entries are built
in a private temp folder and renamed into place, under a file lock per entry, so parallel jobs never
see a half-written entry and never compute one entry twice: the second job waits, then reads. In a
distributed run rank 0 alone reads, locks and writes entries (``get_or_compute``).

Batched model work (generations, likelihoods) goes through ``batched``: the same model, texts and
settings are computed once, each rank of a distributed run computes its share of the batches, and a
long stage commits its finished chunks so that a killed run resumes from its last chunk.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from laffi_exp import distributed
from laffi_exp.core.hashing import key
from laffi_exp.core.io import read_json, read_jsonl, write_json, write_jsonl
from laffi_exp.models.generation import batches

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"


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
        self.events[label] = {
            "key": self.key(spec),
            "hit": hit,
            "cached": self.enabled,
            "seconds": round(time.time() - started, 2),
        }

    def get_or_build(self, stage: str, spec: Any, build: Callable[[Path], None], label: str | None = None) -> Path:
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


@dataclass(frozen=True)
class EntryFile:
    """How a batched stage's results are stored in its cache entry (one file, a list of values)."""

    name: str
    write: Callable[[Path, list], None]
    read: Callable[[Path], list]


GENERATIONS = EntryFile(
    "generations.jsonl",
    lambda path, texts: write_jsonl(path, [{"text": t} for t in texts]),
    lambda path: [row["text"] for row in read_jsonl(path)],
)
LOGPROBS = EntryFile("logprobs.json", lambda path, values: write_json(path, values, indent=None), read_json)


def batched(
    cache: StageCache,
    stage: str,
    spec: dict[str, Any],
    tokenizer,
    prompts: Sequence[str],
    groups: Sequence[Hashable] | None,
    batch_size: int,
    work: Callable[[list[int], list[int]], list[Any]],
    file: EntryFile,
    chunk_batches: int,
    label: str,
) -> list[Any]:
    """``work(indices, shared)`` over every prompt, through the cache entry of ``spec``: the batches are
    those ``generation.batches`` forms (``shared``: the tokens each prompt shares with its group), each
    rank works through its share of them and every rank gets all results, in prompt order."""
    folder = partial_dir(cache, stage, spec, chunk_batches)

    def compute() -> list[Any]:
        plan, shared = batches(tokenizer, prompts, batch_size, groups)
        results = in_chunks(folder, plan, lambda mine: work(mine, shared), len(prompts), chunk_batches, label)
        if distributed.world_size() > 1:  # what each rank did (the two-rank tests read the generation lines)
            log.info(
                "%s %s: rank %d/%d %s %d of %d prompts",
                "Generation" if stage == "generations" else "Likelihoods",
                label,
                distributed.rank(),
                distributed.world_size(),
                "generated" if stage == "generations" else "scored",
                len(distributed.my_share(plan)),
                len(prompts),
            )
        return results

    results = cache.get_or_compute(
        stage,
        spec,
        compute,
        lambda entry, values: file.write(entry / file.name, values),
        lambda entry: file.read(entry / file.name),
        label=label,
    )
    drop(folder)
    return results


def partial_dir(cache: StageCache, stage: str, spec: dict[str, Any], chunk_batches: int) -> Path | None:
    """Where a batched stage commits its finished chunks (``chunk_batches`` batches per rank each) until
    its cache entry is written: tied to the entry's key and to the chunking."""
    if chunk_batches <= 0 or not cache.enabled:
        return None
    return cache.root / "partial" / stage / f"{cache.key(spec)}-{chunk_batches * distributed.world_size()}"


def drop(folder: Path | None) -> None:
    """Remove a stage's resume files once its entry is in the cache (or it needs none)."""
    if folder is not None and distributed.is_main():
        shutil.rmtree(folder, ignore_errors=True)


def in_chunks(folder: Path | None, plan: list[list[int]], work, n: int, chunk_batches: int, label: str) -> list[Any]:
    """``work(indices)`` over this rank's whole batches of ``plan``, gathered in item order on every rank,
    a chunk at a time: each chunk of ``chunk_batches`` batches per rank is committed to ``folder``
    (rank 0 writes it atomically) as it finishes, and a stage killed midway starts again at its first
    uncommitted chunk. The batches are the plan's whatever the chunking, so the results are the same; a
    chunk holds a whole number of batches per rank, so each batch goes to the rank ``my_share(plan)``
    gives it."""
    out: list[Any] = [None] * n
    if folder is None:
        mine = distributed.my_share(plan)
        return distributed.gather_in_order(mine, work(mine), n)
    size = chunk_batches * distributed.world_size()
    chunks = [plan[i : i + size] for i in range(0, len(plan), size)]

    def committed() -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.json")) if folder.is_dir() else []

    done = distributed.on_main(committed)
    if done:
        log.info("%s: %d of %d chunks already done (%s)", label, len(done), len(chunks), folder)
    for c, chunk in enumerate(chunks):
        indices = [i for batch in chunk for i in batch]
        if c in done:
            results = read_json(folder / f"chunk-{c:05d}.json")["results"]
        else:
            mine = distributed.my_share(chunk)
            at = {i: k for k, i in enumerate(indices)}
            results = distributed.gather_in_order([at[i] for i in mine], work(mine), len(indices))
            if distributed.is_main():
                write_json(folder / f"chunk-{c:05d}.json", {"indices": indices, "results": results}, indent=None)
        for i, value in zip(indices, results):
            out[i] = value
    return out
