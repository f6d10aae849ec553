"""Hashes: deterministic draws (which examples go to humans, which shots a prompt shows; stable across
runs, machines and processes, independent of any RNG state), and the content keys and fingerprints
that identify stage inputs, model weights and files (the stage cache's keys, run manifests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


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
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return {
        "path": str(root.resolve()),
        "files": [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


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
        "laffi_exp": laffi_exp.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
    }
