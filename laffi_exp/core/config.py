"""Where the Hydra configs live, and the checks a config must pass before any heavy work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from laffi_exp.core.errors import ConfigError
from laffi_exp.core.io import atomic_write_text

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # package data: found in any install, editable or not

# Keys that change no result: where things go, how they are shown or logged, how an endpoint is reached.
# The stage cache leaves them out of its keys and a re-run sweep out of the comparison of configs.
NO_RESULT_GROUPS = ("paths", "logger", "cache", "hydra", "analysis")  # analysis: reads a finished run
NO_RESULT_TRAINER_KEYS = (
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
    "logger",
    "default_root_dir",
)
NO_RESULT_LEAVES = ("cache_dir", "convert_dir", "num_samples_logged", *NO_RESULT_TRAINER_KEYS[:3])  # at any depth
TRANSPORT_KEYS = (  # how an endpoint or a download is reached (not what it answers)
    "feedback.synthetic.max_concurrency",
    "feedback.synthetic.max_retries",
    "feedback.synthetic.timeout",
    "dataset.download_timeout",
)


# Keys of ``model`` that the run reads (its name, LoRA targets, training length), not arguments of the model
# source that ``model._target_`` names.
MODEL_RUN_KEYS = ("name", "target_modules", "max_length", "micro_batch_tokens")


def model_source(cfg: DictConfig) -> dict[str, Any]:
    """The model source's config, resolved: ``model`` without :data:`MODEL_RUN_KEYS`. A run dir written
    before laffi_exp 0.4 holds it under ``model.source``."""
    node = cfg.model.source if "source" in cfg.model else cfg.model
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in MODEL_RUN_KEYS}


def flatten(node: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """A nested dict as flat ``a.b.c`` keys (``sep`` between the parts, ``prefix`` before them all)."""
    if isinstance(node, dict):
        return {
            k: v
            for key, child in node.items()
            for k, v in flatten(child, f"{prefix}{sep}{key}" if prefix else str(key), sep).items()
        }
    return {prefix: node}


def _number(cfg: DictConfig, key: str, lo: float, hi: float, integer: bool = False) -> None:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        bounds = f"in [{lo}, {hi}]" if hi != float("inf") else f">= {lo}"
        raise ConfigError(f"{key}: expected {kind} {bounds}, got {value!r}")


def _missing_keys(node, prefix: str = "") -> list[str]:
    """Keys still set to ``???``, in config order. Not ``OmegaConf.missing_keys``: it resolves every
    interpolation on the way, and fails on one that points at a missing value (``name: ${.name_or_path}``)
    or at Hydra's runtime outside a run, before it could name the missing key."""
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
        raise ConfigError(
            f"feedback.human.on_missing: expected 'error' or 'synthetic', got {cfg.feedback.human.on_missing!r}"
        )
    for key in ("dataset.num_train", "dataset.num_eval"):
        _number(cfg, key, 1, float("inf"), integer=True)
    _number(cfg, "method.batch_size", 1, float("inf"), integer=True)
    _number(cfg, "method.warmup_ratio", 0.0, 1.0)
    _number(cfg, "model.max_length", 8, float("inf"), integer=True)
    if cfg.model.get("micro_batch_tokens") is not None:
        _number(cfg, "model.micro_batch_tokens", 1, float("inf"), integer=True)
    _number(cfg, "generation.max_new_tokens", 1, float("inf"), integer=True)
    _number(cfg, "generation.feedback_max_new_tokens", 1, float("inf"), integer=True)
    _number(cfg, "generation.batch_size", 1, float("inf"), integer=True)
    _number(cfg, "dataset.num_val", 1, float("inf"), integer=True)
    _lora(cfg)
    _optimizer(cfg)
    _templates(cfg)
    _writable(cfg, "paths.cache_dir")
    if not isinstance(cfg.method.get("trains_on_feedback"), bool):
        raise ConfigError(
            f"method.trains_on_feedback: expected true or false, got {cfg.method.get('trains_on_feedback')!r}"
        )
    unknown = set(cfg.evaluation.protocols) - {"direct", "reflect"}
    if unknown:
        raise ConfigError(
            f"evaluation.protocols: unknown protocol(s) {sorted(unknown)}; expected direct and/or reflect"
        )
    if cfg.cache.on_changed not in ("error", "rerun"):
        raise ConfigError(f"cache.on_changed: expected 'error' or 'rerun', got {cfg.cache.on_changed!r}")
    for key in ("cache.checkpoint_every", "cache.chunk_batches"):
        if OmegaConf.select(cfg, key) is not None:
            _number(cfg, key, 0, float("inf"), integer=True)
    if "FSDPStrategy" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")) and OmegaConf.select(
        cfg, "model.load_in_4bit", default=False
    ):
        raise ConfigError(
            "trainer=fsdp with model.load_in_4bit: FSDP does not shard 4-bit weights; use trainer=ddp for QLoRA"
        )
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps is not None and max_steps != -1:
        _number(cfg, "trainer.max_steps", 1, float("inf"), integer=True)


def _lora(cfg: DictConfig) -> None:
    """The LoRA arguments peft would refuse only once the model is wrapped (after stages 1 and 2)."""
    _number(cfg, "method.lora.r", 1, float("inf"), integer=True)
    _number(cfg, "method.lora.lora_alpha", 1e-12, float("inf"))
    _number(cfg, "method.lora.lora_dropout", 0.0, 0.999999)
    targets = OmegaConf.select(cfg, "method.lora.target_modules")
    if targets is not None and not (isinstance(targets, str) or len(targets) > 0):
        raise ConfigError(
            "method.lora.target_modules: expected module names (e.g. [q_proj, v_proj]), got an empty list"
        )


def _optimizer(cfg: DictConfig) -> None:
    """Build the optimizer once on a dummy parameter: a bad learning rate or argument fails here."""
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        instantiate(cfg.method.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"method.optimizer: {str(cause).strip().splitlines()[0]}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method.optimizer: {str(err).strip().splitlines()[0]}") from None


TEMPLATE_FIELDS = {
    "answer_template": ("context", "question"),
    "feedback_template": ("context", "question", "prediction"),
}


def _templates(cfg: DictConfig) -> None:
    """Format every prompt template with dummy fields: an unknown field or a stray brace fails here."""
    for key, fields in TEMPLATE_FIELDS.items():
        template = OmegaConf.select(cfg, f"prompt.{key}")
        if not isinstance(template, str):
            raise ConfigError(f"prompt.{key}: expected a text, got {template!r}")
        try:
            template.format(**dict.fromkeys(fields, "x"))
        except KeyError as err:
            raise ConfigError(
                f"prompt.{key}: unknown field {{{err.args[0]}}}; "
                f"the fields are {', '.join('{' + f + '}' for f in fields)}"
            ) from None
        except (IndexError, ValueError) as err:
            raise ConfigError(
                f"prompt.{key}: not a format string ({err}); write a literal brace as {{{{ or }}}}"
            ) from None


def _writable(cfg: DictConfig, key: str) -> None:
    """The folder (created if absent) takes a file: checked before anything is computed into it."""
    import tempfile

    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    path = Path(str(value)).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {path} ({err.strerror or err})") from None


def write_resolved_config(cfg: DictConfig, path: Path) -> None:
    """The config with every interpolation resolved, as YAML: what a run dir or an adapter explains itself by."""
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
