"""Where the Hydra configs live, and the checks a config must pass before any heavy work starts."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from laffi_exp.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _number(cfg: DictConfig, key: str, lo: float, hi: float, integer: bool = False) -> None:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        bounds = f"in [{lo}, {hi}]" if hi != float("inf") else f">= {lo}"
        raise ConfigError(f"{key}: expected {kind} {bounds}, got {value!r}")


def _missing_keys(node, prefix: str = "") -> list[str]:
    """Keys still set to ``???``, found without resolving interpolations (which would fail on them)."""
    if isinstance(node, dict):
        return [m for k, v in node.items() for m in _missing_keys(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [m for i, v in enumerate(node) for m in _missing_keys(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if node == "???" else []


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (naming the key and what was expected) for anything a run cannot use."""
    missing = _missing_keys(OmegaConf.to_container(cfg, resolve=False))
    if missing:
        raise ConfigError(f"{missing[0]}: a value is required (set it on the command line, e.g. {missing[0]}=...)")
    for group in ("dataset", "model", "feedback", "method", "trainer"):
        if group not in cfg:
            raise ConfigError(f"{group}: the config group is missing from the composed config")
    _number(cfg, "seed", 0, 2**32 - 1, integer=True)
    _number(cfg, "feedback.human_ratio", 0.0, 1.0)
    _number(cfg, "feedback.overlap_ratio", 0.0, 1.0)
    if cfg.feedback.human.get("on_missing", "error") not in ("error", "synthetic"):
        raise ConfigError(f"feedback.human.on_missing: expected 'error' or 'synthetic', got {cfg.feedback.human.on_missing!r}")
    for key in ("dataset.num_train", "dataset.num_eval"):
        _number(cfg, key, 1, float("inf"), integer=True)
    _number(cfg, "method.batch_size", 1, float("inf"), integer=True)
    _number(cfg, "method.warmup_ratio", 0.0, 1.0)
    _number(cfg, "model.max_length", 8, float("inf"), integer=True)
    if cfg.model.get("micro_batch_tokens") is not None:
        _number(cfg, "model.micro_batch_tokens", 1, float("inf"), integer=True)
    _number(cfg, "generation.max_new_tokens", 1, float("inf"), integer=True)
    if cfg.method.name not in ("laffi", "sft"):
        raise ConfigError(f"method.name: expected 'laffi' or 'sft', got {cfg.method.name!r}")
    unknown = set(cfg.evaluation.protocols) - {"direct", "reflect"}
    if unknown:
        raise ConfigError(f"evaluation.protocols: unknown protocol(s) {sorted(unknown)}; expected direct and/or reflect")
    if cfg.cache.on_changed not in ("error", "rerun"):
        raise ConfigError(f"cache.on_changed: expected 'error' or 'rerun', got {cfg.cache.on_changed!r}")
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps is not None and max_steps != -1:
        _number(cfg, "trainer.max_steps", 1, float("inf"), integer=True)
