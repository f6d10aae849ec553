"""Reading on/off switches from the environment, the way huggingface_hub reads its own."""

from __future__ import annotations

import os


def env_true(name: str) -> bool:
    """Whether the environment variable ``name`` is set to 1, true, yes or on (any case)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
