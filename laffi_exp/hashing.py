"""Deterministic draws from hashes: which examples go to humans, which shots a prompt shows. Stable
across runs, machines and processes, and independent of any RNG state."""

from __future__ import annotations

import hashlib


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
