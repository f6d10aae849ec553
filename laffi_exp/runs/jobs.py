"""The jobs of a sweep, read from its folder: each job dir's method, human share, seed and metrics."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from laffi_exp.core.io import read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One job dir of the sweep. ``metrics`` is None when it has no ``metrics.json``."""

    name: str  # path relative to the sweep dir
    path: Path
    method: str | None
    human_ratio: float | None  # laffi only: the configured feedback.human_ratio
    seed: int | None
    metrics: dict[str, float] | None


def note(notes: list[str] | None, message: str) -> None:
    log.warning(message)
    if notes is not None:
        notes.append(message)


# --- Reading the sweep --------------------------------------------------------------------------


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Every folder under ``sweep_dir`` (itself included) that holds ``metrics.json`` or ``.hydra/``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(sweep_dir):
        if "metrics.json" in filenames or ".hydra" in dirnames:
            found.append(Path(dirpath))
            dirnames.clear()  # a job's own folders (adapter/, csv/) are not jobs
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def _natural_key(name: str) -> list:
    # Job 10 after job 9, as Hydra numbers them.
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def load_job(path: Path, sweep_dir: Path, notes: list[str] | None = None) -> Job:
    """Read one job dir: its config (``config.yaml`` the pipeline writes resolved, else
    ``.hydra/config.yaml``) and its numeric metrics."""
    rel = path.relative_to(sweep_dir).as_posix()
    name = path.name if rel == "." else rel
    cfg = _load_config(path, name, notes)
    method = _select(cfg, "method.name")
    seed = _select(cfg, "seed")
    ratio = _select(cfg, "feedback.human_ratio")
    metrics = None
    if (path / "metrics.json").is_file():
        try:
            raw = read_json(path / "metrics.json")
            metrics = {k: v for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        except (OSError, ValueError, AttributeError) as err:
            note(notes, f"job {name}: unreadable metrics.json ({err}); counted as missing")
    return Job(
        name=name,
        path=path,
        method=str(method) if method is not None else None,
        human_ratio=float(ratio) if method == "laffi" and isinstance(ratio, (int, float)) else None,
        seed=int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None,
        metrics=metrics,
    )


def _load_config(path: Path, name: str, notes: list[str] | None) -> DictConfig | None:
    for candidate in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        if candidate.is_file():
            try:
                return OmegaConf.load(candidate)
            except Exception as err:  # noqa: BLE001 - a YAML or OmegaConf error: note it, try the other file
                note(notes, f"job {name}: cannot read {candidate.name} ({err})")
    note(notes, f"job {name}: no config.yaml or .hydra/config.yaml; method, ratio and seed unknown")
    return None


def _select(cfg: DictConfig | None, key: str) -> Any:
    # Interpolations such as ${hydra:...} do not resolve outside Hydra: they read as None here.
    if cfg is None:
        return None
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)


def load_jobs(sweep_dir: Path, notes: list[str] | None = None) -> list[Job]:
    return [load_job(path, sweep_dir, notes) for path in find_job_dirs(sweep_dir)]


def label(method: str, ratio: float | None, protocol: str) -> str:
    """A series' name in notes and tables: ``laffi 50% human (direct)``."""
    share = f" {ratio * 100:g}% human" if ratio is not None else ""
    return f"{method}{share} ({protocol})"
