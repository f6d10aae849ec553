"""Before the stages: check the config and every input, read the data, load the base model. The
:class:`Setup` it returns is what every stage reads; the stages return what they produce."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from laffi_exp import distributed
from laffi_exp.core.config import model_source, validate
from laffi_exp.core.errors import ConfigError
from laffi_exp.core.hashing import code_versions, key, text_digest, weights_fingerprint
from laffi_exp.core.io import write_json
from laffi_exp.core.prompts import Prompter
from laffi_exp.core.records import QAExample
from laffi_exp.data.base import DataSource
from laffi_exp.data.squad_format import examples_from_squad
from laffi_exp.data.window import fit_contexts
from laffi_exp.feedback.base import Annotator
from laffi_exp.models.base import ModelSource
from laffi_exp.models.generation import generate, sequence_logprobs
from laffi_exp.stages.cache import GENERATIONS, LOGPROBS, StageCache, batched
from laffi_exp.stages.train_module import rng_state

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """What every stage reads: the config, the run dir, the data and the loaded base model."""

    cfg: DictConfig
    out: Path  # the run dir
    prompter: Prompter
    splits: dict[str, list[QAExample]]  # train, validation, test
    model: torch.nn.Module  # the base model, on the generation device
    tokenizer: Any  # its transformers tokenizer
    model_key: str  # identifies the base weights (cache keys of everything generated from them)
    cache: StageCache
    human: Annotator | None  # the two feedback pools, where the method trains on feedback
    synthetic: Annotator | None
    source: ModelSource  # what loaded the base model (loads it again after FSDP training)
    rng: dict[str, Any]  # the random state after set-up, restored before the adapter is built
    metrics: dict[str, Any]  # what set-up measured (passages shortened to the window)

    def generations(
        self,
        model,
        model_key: str,
        prompts: Sequence[str],
        max_new_tokens: int,
        groups: Sequence[Hashable] | None = None,
        label: str = "generate",
    ) -> list[str]:
        """``generation.generate`` through the stage cache: the same model, prompts and settings are
        generated once. With several ranks each generates its share of the batches, and every rank
        gets all texts."""
        spec = {
            "model": model_key,
            "prompts": text_digest(prompts),
            "n": len(prompts),
            "max_new_tokens": max_new_tokens,
        }

        def work(mine: list[int], shared: list[int], size: int) -> list[str]:
            return generate(
                model,
                self.tokenizer,
                [prompts[i] for i in mine],
                max_new_tokens,
                size,
                desc=label,
                groups=[groups[i] for i in mine] if groups else None,
                shared=[shared[i] for i in mine],
            )

        return self._batched("generations", spec, prompts, groups, work, GENERATIONS, label)

    def likelihoods(
        self,
        model,
        model_key: str,
        prompts: Sequence[str],
        continuations: Sequence[str],
        groups: Sequence[Hashable] | None = None,
        label: str = "likelihood",
    ) -> list[float]:
        """``generation.sequence_logprobs`` through the stage cache, shared between ranks like ``generations``."""
        pairs = [p + "\x00" + c for p, c in zip(prompts, continuations)]
        spec = {"model": model_key, "pairs": text_digest(pairs), "n": len(pairs)}

        def work(mine: list[int], shared: list[int], size: int) -> list[float]:
            return sequence_logprobs(
                model,
                self.tokenizer,
                [prompts[i] for i in mine],
                [continuations[i] for i in mine],
                size,
                groups=[groups[i] for i in mine] if groups else None,
                shared=[shared[i] for i in mine],
            )

        return self._batched("likelihoods", spec, prompts, groups, work, LOGPROBS, label)

    def _batched(self, stage: str, spec: dict[str, Any], prompts, groups, work, file, label: str) -> list[Any]:
        """``stages.cache.batched`` with the run's batch size, chunking and cache; the batch size and the
        grouping complete the entry's spec."""
        size = self.cfg.generation.batch_size
        spec = {**spec, "batch_size": size, "groups": text_digest(groups) if groups else None}
        return batched(
            self.cache,
            stage,
            spec,
            self.tokenizer,
            prompts,
            groups,
            size,
            lambda mine, shared: work(mine, shared, size),
            file,
            self.cfg.cache.chunk_batches,
            label,
        )

    def generator(self, model, model_key: str, label: str) -> Callable[[list[str], int, list[str]], list[str]]:
        """``generations`` for one model, as the stages' ``generate_fn(prompts, max_new_tokens, groups)``."""
        return partial(self.generations, model, model_key, label=label)


def setup(cfg: DictConfig) -> Setup:
    """Validate the config and every input, then read the data and load the base model."""
    validate(cfg)
    out = Path(cfg.paths.output_dir)
    dataset: DataSource = instantiate(cfg.dataset)
    dataset.check()
    source_cfg = model_source(cfg)  # resolved once: the source's arguments and its part of the model key
    source: ModelSource = instantiate(source_cfg)
    source.check()
    prompter = instantiate(cfg.prompt, no_answer_phrases=tuple(cfg.prompt.no_answer_phrases))
    human = synthetic = None
    if cfg.method.trains_on_feedback:
        human, synthetic = instantiate(cfg.feedback.human), instantiate(cfg.feedback.synthetic)
        distributed.on_main(_check_annotators, human, synthetic)  # rank 0 alone annotates
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    with distributed.main_first():  # a download lands once
        raw = dataset.splits()
    splits = {name: examples_from_squad(data, source=f"{cfg.dataset.name}/{name}") for name, data in raw.items()}
    prompter, shot_ids = prompter.with_shots(splits["train"])  # a few-shot answer prompt: shots from train only
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval_data.json", raw["test"], indent=None)  # score again with `python -m laffi_exp.score`
        chosen = {name: [ex.id for ex in exs] for name, exs in splits.items()}
        write_json(out / "chosen_ids.json", {**chosen, "shots": shot_ids} if shot_ids else chosen)
    log.info("Data: %s", ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    with distributed.main_first():  # the embedded base is built once
        base = source.load()
    model, tokenizer = base.model, base.tokenizer
    on_device(model, cfg)
    if base.chat_template:
        prompter = dataclasses.replace(prompter, wrap=base.format_prompt)
    metrics: dict[str, Any] = {}
    # Passages longer than the model's window are shortened (see laffi_exp/data/window.py).
    gen = cfg.generation
    window = min(cfg.model.max_length, getattr(model.config, "max_position_embeddings", None) or cfg.model.max_length)
    budget = window - gen.max_new_tokens - gen.feedback_max_new_tokens
    _check_window(splits, tokenizer, prompter, window, budget)
    for name in splits:
        splits[name], metrics[f"data/shortened_{name}"] = fit_contexts(
            splits[name], tokenizer, prompter, budget, around_answer=name != "test"
        )
    model_spec = {
        "model": source_cfg,
        "weights": base.fingerprint or weights_fingerprint(base.path, source_cfg.get("cache_dir")),
        "code": code_versions(),
    }
    cache = StageCache(cfg.cache.dir, enabled=cfg.cache.enabled)
    # The adapter's initialisation draws from the global RNG; its cache key assumes the seed alone decides
    # it, so it must not depend on what stages 1 and 2 drew (an annotator model loaded on a cache miss).
    return Setup(
        cfg,
        out,
        prompter,
        splits,
        model,
        tokenizer,
        key(model_spec),
        cache,
        human,
        synthetic,
        source,
        rng_state(),
        metrics,
    )


def _check_annotators(*annotators: Annotator) -> None:
    for annotator in annotators:  # a human file is read, an endpoint is reached, before any model work
        annotator.check()


def _check_window(splits, tokenizer, prompter, window: int, budget: int) -> None:
    """The prompt template and generation budgets must leave room for a passage in the model's window."""
    ex = next((ex for split in splits.values() for ex in split), None)
    if ex is None:
        return
    overhead = len(tokenizer(prompter.longest_prompt(dataclasses.replace(ex, context="")))["input_ids"])
    if budget < overhead + 8:
        raise ConfigError(
            f"model.max_length: {window} tokens leave {budget} for a prompt after generation.max_new_tokens and "
            f"generation.feedback_max_new_tokens, and the prompt without its passage takes {overhead}: "
            f"expected at least {overhead + 8 + window - budget}"
        )


def on_device(model, cfg: DictConfig) -> None:
    """Move the model to the generation device. A 4-bit model is placed on its GPU by its loader; it is
    moved back only after Lightning's teardown left it on the CPU (bitsandbytes >= 0.43.2 moves 4-bit
    weights)."""
    device = distributed.generation_device(cfg.trainer.get("accelerator", "cpu"))
    if getattr(model, "is_loaded_in_4bit", False):
        if device.type == "cuda" and next(model.parameters()).device.type != "cuda":
            model.to(device)
        return
    model.to(device)
