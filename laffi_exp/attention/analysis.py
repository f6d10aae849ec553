"""Load a finished run (its resolved config, base model and adapter) and measure its attention on a fixed,
seeded subset of its held-out prompts: the base (adapter disabled) and the fine-tuned model, in the answer
prompt and in the feedback prompt.

The weights come from eager attention (the model is switched to ``attn_implementation="eager"`` for the
analysis; SDPA and flash kernels return none). Memory stays bounded: one batch at a time, each layer's
weights reduced to per-head statistics by a forward hook as soon as the layer has run, so only one layer's
attention of one batch exists at once; full maps are kept only for the example prompts of the plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from laffi_exp.attention.measures import MEASURES, SCOPES, head_measures
from laffi_exp.attention.segments import PROMPTS, SegmentedPrompt, segment_prompt
from laffi_exp.core.config import model_source
from laffi_exp.core.errors import ConfigError
from laffi_exp.core.io import read_json
from laffi_exp.core.prompts import Prompter
from laffi_exp.core.records import QAExample
from laffi_exp.data.squad_format import examples_from_squad
from laffi_exp.data.window import fit_contexts
from laffi_exp.models.padding import pad

log = logging.getLogger(__name__)

MODELS = ("base", "fine_tuned")
OUT_DIR = "attention"
# What a finished run dir holds that the analysis reads (manifest.json says "finished").
REQUIRED = ("config.yaml", "eval_data.json", "predictions.json", "adapter/adapter_config.json")


@dataclass(frozen=True)
class Options:
    """What to analyse; the run's ``analysis.attention_*`` keys set the first four, the CLI any."""

    num: int = 128  # held-out prompts, a fixed seeded subset of the test split
    window: int = 8  # local dependency: keys at distance < window (the query and the window-1 before it)
    far: int = 32  # global dependency: keys at distance > far
    layers: tuple[int, ...] | None = None  # None: every layer
    seed: int = 0  # chooses the prompts (not the run's seed: every run of a sweep gets the same questions)
    batch_size: int = 8
    examples: int = 1  # prompts drawn as example_<id>.png
    device: str = "auto"  # auto (a GPU when there is one) | cpu | cuda | cuda:N; in-process runs keep theirs

    def check(self) -> None:
        for name, lowest in (("num", 1), ("window", 1), ("batch_size", 1), ("far", 0), ("seed", 0), ("examples", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ConfigError(f"{name}: expected an integer >= {lowest}, got {value!r}")
        if self.layers is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in self.layers):
            raise ConfigError(f"layers: expected layer numbers, got {list(self.layers)!r}")

    def recorded(self) -> dict[str, Any]:
        """The options that determine the results (not where or how fast they are computed)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("batch_size", "device")} | {
            "layers": list(self.layers) if self.layers is not None else None
        }


def options_from_config(cfg: DictConfig | None, **overrides: Any) -> Options:
    """Options from a run config's ``analysis`` block (absent in older runs: the defaults), then
    ``overrides`` (None values ignored)."""
    keys = {"num": "attention_num", "window": "attention_window", "far": "attention_far", "layers": "attention_layers"}
    values: dict[str, Any] = {}
    for name, key in keys.items():
        value = OmegaConf.select(cfg, f"analysis.{key}", default=None) if cfg is not None else None
        if value is not None and name == "layers":
            value = (value,) if isinstance(value, int) else tuple(value)
        if value is not None:
            values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    options = Options(**values)
    options.check()
    return options


@dataclass
class LoadedRun:
    """A finished run, ready to analyse: the peft model (adapter loaded), its tokenizer and prompter
    (chat wrapping included), the held-out examples windowed as the run windowed them, and the
    fine-tuned model's predictions."""

    run_dir: Path
    cfg: DictConfig
    model: Any
    tokenizer: Any
    prompter: Prompter
    examples: list[QAExample]
    predictions: dict[str, str]


@dataclass
class Analysis:
    """The statistics: ``values[(prompt, model)]`` is (prompts, layers, scopes, measures, heads), one value
    per held-out prompt; ``maps[(prompt, model)][i]`` the head-averaged (layers, n, n) attention of
    example prompt ``i``."""

    run_dir: Path
    options: Options
    method: str
    model_name: str
    ids: list[str]
    answerable: list[bool]
    layers: list[int]
    heads: int
    prompts: dict[str, list[SegmentedPrompt]]
    values: dict[tuple[str, str], np.ndarray]
    example_indices: list[int]
    maps: dict[tuple[str, str], dict[int, np.ndarray]] = field(default_factory=dict)
    seconds: float = 0.0


# -- the run dir ----------------------------------------------------------------------------------
def check_run_dir(run_dir: Path) -> None:
    """Raise ConfigError unless ``run_dir`` holds a finished run with everything the analysis reads."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run dir")
    manifest = run_dir / "manifest.json"
    status = read_json(manifest).get("status") if manifest.is_file() else None
    if status != "finished":
        shown = f"status {status!r}" if status else "no manifest.json"
        raise ConfigError(f"{run_dir}: not a finished run ({shown}); the attention analysis needs a run that finished")
    missing = [name for name in REQUIRED if not (run_dir / name).is_file()]
    if missing:
        raise ConfigError(f"{run_dir}: the finished run lacks {', '.join(missing)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} asked for, but no CUDA GPU is available")
    return device


def run_prompter(cfg: DictConfig, base: Any) -> Prompter:
    """The run's prompter, wrapping prompts in the chat template where the run did (as stages.setup does)."""
    from hydra.utils import instantiate

    prompter = instantiate(cfg.prompt, no_answer_phrases=tuple(cfg.prompt.no_answer_phrases))
    if base.chat_template:
        prompter = dataclasses.replace(prompter, wrap=base.format_prompt)
    return prompter


def held_out(run_dir: Path, cfg: DictConfig, model, tokenizer, prompter: Prompter) -> list[QAExample]:
    """The run's test questions (``eval_data.json``), their passages shortened exactly as
    ``stages.setup`` shortened them for evaluation."""
    examples = examples_from_squad(read_json(run_dir / "eval_data.json"), source=str(run_dir / "eval_data.json"))
    gen = cfg.generation
    window = min(cfg.model.max_length, getattr(model.config, "max_position_embeddings", None) or cfg.model.max_length)
    budget = window - gen.max_new_tokens - gen.feedback_max_new_tokens
    return fit_contexts(examples, tokenizer, prompter, budget, around_answer=False)[0]


def load_run(run_dir: Path, device: str = "auto", loaded: tuple[Any, Any, Prompter] | None = None) -> LoadedRun:
    """Read a finished run dir. ``loaded`` (peft model, tokenizer, prompter) reuses a run's own objects
    (the pipeline's, at the end of a run); otherwise the base model is loaded from the run's config
    (``model``) and the adapter from ``RUN_DIR/adapter``."""
    from hydra.utils import instantiate

    check_run_dir(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if loaded is not None:
        model, tokenizer, prompter = loaded
    else:
        from peft import PeftModel

        base = instantiate(model_source(cfg)).load()
        tokenizer, prompter = base.tokenizer, run_prompter(cfg, base)
        model = PeftModel.from_pretrained(base.model, str(run_dir / "adapter"))
        if not getattr(base.model, "is_loaded_in_4bit", False):  # 4-bit weights sit on their GPU already
            model.to(resolve_device(device))
    predictions = read_json(run_dir / "predictions.json")
    examples = held_out(run_dir, cfg, model, tokenizer, prompter)
    return LoadedRun(run_dir, cfg, model, tokenizer, prompter, examples, predictions)


# -- the model ------------------------------------------------------------------------------------
def inner_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """The model with eager attention (the only implementation that returns weights), put back after."""
    inner = inner_model(model)
    previous = inner.config._attn_implementation
    if previous != "eager":
        inner.set_attn_implementation("eager")
    if inner.config._attn_implementation != "eager":
        raise ConfigError(
            f"{type(inner).__name__}: cannot switch to eager attention, so no attention weights can be read"
        )
    try:
        yield
    finally:
        if previous != "eager":
            inner.set_attn_implementation(previous)


def attention_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's attention module, in layer order: the children named ``*attn``/``*attention``
    of the module list that holds ``num_hidden_layers`` layers (Llama, Gemma, Qwen, GPT-NeoX, GPT-2, ...)."""
    inner = inner_model(model)
    count = inner.config.get_text_config().num_hidden_layers
    for module in inner.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            found = [_attention_child(layer) for layer in module]
            if all(m is not None for m in found):
                return found
    raise ConfigError(f"{type(inner).__name__}: cannot find the attention module of each of its {count} layers")


def _attention_child(layer: torch.nn.Module) -> torch.nn.Module | None:
    return next((child for name, child in layer.named_children() if name.endswith(("attn", "attention"))), None)


def check_layers(layers: Sequence[int] | None, count: int) -> list[int]:
    """The layers to analyse: all when None; negative indices count from the end."""
    if layers is None:
        return list(range(count))
    chosen = []
    for layer in layers:
        index = layer + count if layer < 0 else layer
        if not 0 <= index < count:
            raise ConfigError(f"layers: layer {layer} is not one of the model's {count} layers (0-{count - 1})")
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)


@torch.inference_mode()
def collect(
    model,
    prompts: Sequence[SegmentedPrompt],
    layers: Sequence[int],
    window: int,
    far: int,
    batch_size: int = 8,
    keep: Sequence[int] = (),
    pad_id: int = 0,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Run ``model`` on ``prompts`` and keep the statistics of ``measures.head_measures`` for every prompt
    and analysed layer: a (prompts, layers, scopes, measures, heads) array. Prompts ``keep`` also keep
    their head-averaged maps, (layers, n, n) each.

    Batches of similar length, right-padded: every real token keeps the positions and (by causality) the
    attention it has alone, so the statistics do not depend on the batch size."""
    modules = attention_modules(model)
    device = next(model.parameters()).device
    keep = set(keep)
    values: np.ndarray | None = None
    kept: dict[int, np.ndarray] = {}
    batch: list[int] = []
    masks: list[dict[str, torch.Tensor]] = []

    def hook_for(k: int, layer: int):
        def hook(module, args, output) -> None:
            nonlocal values
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
                raise ConfigError(f"layer {layer}: its attention returned no weights (is the attention eager?)")
            if values is None:
                shape = (len(prompts), len(layers), len(SCOPES), len(MEASURES), weights.shape[1])
                values = np.full(shape, np.nan, np.float32)
            for b, i in enumerate(batch):
                n = prompts[i].length
                attn = weights[b, :, :n, :n]
                values[i, k] = head_measures(attn, masks[b], window, far).cpu().numpy()
                if i in keep:
                    maps = kept.setdefault(i, np.zeros((len(layers), n, n), np.float32))
                    maps[k] = attn.float().mean(0).cpu().numpy()

        return hook

    inner = inner_model(model)
    extra = {"logits_to_keep": 1} if getattr(inner, "_supports_logits_to_keep", lambda: False)() else {}
    handles = [modules[layer].register_forward_hook(hook_for(k, layer)) for k, layer in enumerate(layers)]
    was_training = model.training
    model.eval()  # no LoRA dropout
    try:
        order = sorted(range(len(prompts)), key=lambda i: prompts[i].length)
        for start in range(0, len(order), batch_size):
            batch[:] = order[start : start + batch_size]
            input_ids, attention_mask = pad([prompts[i].input_ids for i in batch], pad_id)
            masks[:] = [{k: torch.from_numpy(m).to(device) for k, m in prompts[i].masks.items()} for i in batch]
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, **extra)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    assert values is not None, "no attention layer ran"
    return values, kept


# -- the analysis ---------------------------------------------------------------------------------
def choose(examples: Sequence[QAExample], num: int, seed: int) -> list[QAExample]:
    """``num`` of the examples (all when fewer), drawn with ``seed``, in their original order."""
    picked = sorted(random.Random(seed).sample(range(len(examples)), min(num, len(examples))))
    return [examples[i] for i in picked]


def analyze(run: LoadedRun, options: Options) -> Analysis:
    """Measure the base (adapter disabled) and the fine-tuned model on the same prompts: the answer
    prompt and the feedback prompt on the fine-tuned model's own prediction (``predictions.json``, the
    answer it gave), so that both models read exactly the same tokens."""
    started = time.time()
    options.check()
    model = run.model
    layers = check_layers(options.layers, inner_model(model).config.get_text_config().num_hidden_layers)
    chosen = choose(run.examples, options.num, options.seed)
    if not chosen:
        raise ConfigError(f"{run.run_dir}: the run has no held-out questions")
    missing = [ex.id for ex in chosen if ex.id not in run.predictions]
    if missing:
        raise ConfigError(f"{run.run_dir / 'predictions.json'}: no prediction for question(s) {', '.join(missing[:5])}")
    prompts = {
        kind: [segment_prompt(run.tokenizer, run.prompter, kind, ex, run.predictions[ex.id]) for ex in chosen]
        for kind in PROMPTS
    }
    answerable = [bool(ex.answers) for ex in chosen]
    # The example maps: answerable questions first (they have a gold span to show).
    example_indices = sorted(range(len(chosen)), key=lambda i: not answerable[i])[: options.examples]
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    values, maps = {}, {}
    with eager_attention(model):
        for kind in PROMPTS:
            for name in MODELS:
                log.info("Attention: %s prompt, %s model, %d prompts", kind, name, len(chosen))
                with model.disable_adapter() if name == "base" else contextlib.nullcontext():
                    values[(kind, name)], maps[(kind, name)] = collect(
                        model,
                        prompts[kind],
                        layers,
                        options.window,
                        options.far,
                        options.batch_size,
                        example_indices,
                        pad_id,
                    )
    return Analysis(
        run_dir=run.run_dir,
        options=options,
        method=str(OmegaConf.select(run.cfg, "method.name", default="?")),
        model_name=str(OmegaConf.select(run.cfg, "model.name", default="?")),
        ids=[ex.id for ex in chosen],
        answerable=answerable,
        layers=layers,
        heads=values[(PROMPTS[0], MODELS[0])].shape[-1],
        prompts=prompts,
        values=values,
        example_indices=example_indices,
        maps=maps,
        seconds=round(time.time() - started, 1),
    )
