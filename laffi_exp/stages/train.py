"""Stage 3, fine-tuning with LoRA: the method's (prompt, target) pairs (``train_data``: feedback
prediction for laffi, gold answers for sft), Lightning's ``fit`` of the adapter (``train_module``),
checkpoints that a killed run resumes from (``train_checkpoints``), and the trained adapter through
the stage cache: the same inputs train once, a cached adapter is loaded and its loss curves replayed.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from laffi_exp import distributed
from laffi_exp.core.config import NO_RESULT_TRAINER_KEYS, write_resolved_config
from laffi_exp.core.hashing import text_digest
from laffi_exp.core.io import read_json, read_jsonl, write_json, write_jsonl
from laffi_exp.core.records import Feedback
from laffi_exp.distributed import fsdp
from laffi_exp.stages.cache import drop
from laffi_exp.stages.setup import Setup, on_device
from laffi_exp.stages.train_checkpoints import TrainingCheckpoints
from laffi_exp.stages.train_data import PairDataModule
from laffi_exp.stages.train_module import HistoryLogger, LoRAFineTuner, save_adapter, set_rng_state

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """What stage 3 gives evaluation: the peft model (on the generation device) and its cache key."""

    model: Any
    key: str  # identifies the adapter (cache keys of everything generated with it)
    metrics: dict[str, Any]  # train/* -> metrics.json


def fine_tune(s: Setup, feedback: dict[str, list[Feedback]], loggers: dict[str, Any]) -> Trained:
    """Train the LoRA adapter on the method's pairs, or load the one trained on the same inputs before."""
    cfg = s.cfg
    build_pairs = instantiate(cfg.method.pairs)
    train_pairs = build_pairs(s.splits["train"], feedback.get("train", []), s.prompter)
    val_pairs = build_pairs(s.splits["validation"], feedback.get("validation", []), s.prompter)
    trainer_cfg = {
        k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k not in NO_RESULT_TRAINER_KEYS
    }
    spec = {
        "model": s.model_key,
        "train": text_digest(t for p in train_pairs for t in (p.prompt, p.target)),
        "validation": text_digest(t for p in val_pairs for t in (p.prompt, p.target)),
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "max_length": cfg.model.max_length,
        "micro_batch_tokens": cfg.model.get("micro_batch_tokens"),  # the same gradient up to float rounding
        "seed": cfg.seed,
        "trainer": trainer_cfg,
        "world_size": distributed.world_size(),  # the global batch
        "device": distributed.generation_device(cfg.trainer.get("accelerator", "cpu")).type,
    }
    if fsdp.uses_fsdp(cfg):
        spec["fsdp_scheme"] = fsdp.FSDP_SCHEME  # how laffi_exp sets FSDP up (units, precision)
    model = s.model

    def compute() -> dict[str, Any]:  # on every rank: Lightning's DDP/FSDP finds the process group started
        nonlocal model
        datamodule = PairDataModule(
            s.tokenizer,
            train_pairs,
            val_pairs,
            cfg.method.batch_size,
            cfg.model.max_length,
            cfg.seed,
            group_by_length=cfg.method.group_by_length,
        )
        lora = instantiate(cfg.method.lora, _convert_="all")
        set_rng_state(s.rng)
        module = LoRAFineTuner(
            s.model,
            lora,
            instantiate(cfg.method.optimizer),
            cfg.method.warmup_ratio,
            micro_batch_tokens=cfg.model.get("micro_batch_tokens"),
        )
        history = HistoryLogger()
        trainer = instantiate(
            cfg.trainer,
            logger=[*loggers.values(), history],
            default_root_dir=str(s.out),
            callbacks=[checkpoints] if checkpoints else None,
        )
        sharded = isinstance(trainer.strategy, pl.strategies.FSDPStrategy)
        if sharded:
            fsdp.prepare_fsdp(trainer.strategy, module.model, trainer.precision)
        module.train()  # from_pretrained leaves the model in eval mode
        resume = checkpoints.resume_from() if checkpoints else None
        if resume:
            log.info("Training: resuming from %s", resume)
        with warnings.catch_warnings():  # the data position comes back through the sampler (PairDataModule)
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        result = {
            "history": history.rows,
            "train": {
                "train/examples": len(datamodule.train_set),
                "train/dropped_too_long": datamodule.train_set.dropped,
                "train/final_val_loss": float(trainer.callback_metrics.get("val/loss", torch.tensor(float("nan")))),
            },
        }
        if sharded:  # FSDP flattened and sharded the model in place: rebuild it whole, with the trained adapter
            adapter = fsdp.gather_adapter(trainer.strategy, module.model)
            datamodule.trainer = None  # (Lightning's back-reference) so that nothing holds the sharded model
            del trainer, module, datamodule
            model = s.model = None  # the sharded model's last references go before a whole copy loads
            model = fsdp.reloaded(s.source, lora, adapter)
        else:
            model = module.model  # the trained peft model, for evaluation in this process
        return result

    def write(folder: Path, result: dict[str, Any]) -> None:
        save_adapter(model, folder / "adapter")
        write_jsonl(folder / "history.jsonl", result["history"])
        write_json(folder / "train.json", result["train"])

    def read(entry: Path) -> dict[str, Any]:
        return {"history": list(read_jsonl(entry / "history.jsonl")), "train": read_json(entry / "train.json")}

    checkpoints = training_checkpoints(cfg, s.cache.key(spec))
    result = s.cache.get_or_compute("adapters", spec, compute, write, read, label="train")
    drop(checkpoints.folder if checkpoints else None)  # the adapter is in the cache (or this run needs none)
    if s.cache.events["train"]["hit"]:
        from peft import PeftModel

        entry = s.cache.entry("adapters", spec)
        log.info("Training: reusing the adapter trained with the same inputs (%s)", entry)
        model = PeftModel.from_pretrained(model, entry / "adapter")  # every rank (a shared cache dir)
        for row in result["history"]:  # the cached run's loss curves, for this run's loggers
            for lg in loggers.values():
                lg.log_metrics(row["metrics"], step=row["step"])
    on_device(model, cfg)  # Lightning leaves a trained model on the CPU
    if distributed.is_main():
        save_adapter(model, s.out / "adapter")
        write_resolved_config(cfg, s.out / "adapter" / "config.yaml")
    return Trained(model, s.cache.key(spec), result["train"])


def training_checkpoints(cfg: DictConfig, key: str) -> TrainingCheckpoints | None:
    """The resume points of the training run with cache key ``key`` (``cache.checkpoint_every`` steps
    apart, under ``cache.dir/checkpoints/<key>``), or None where they are off or not supported yet."""
    every = int(cfg.cache.get("checkpoint_every", 0) or 0)
    if every <= 0 or not cfg.cache.enabled:
        return None
    one_process = (
        distributed.world_size() == 1 and "strategy" not in cfg.trainer and cfg.trainer.get("devices", 1) in (1, "1")
    )
    if not one_process or cfg.method.get("group_by_length") is False:
        log.info("Training checkpoints: written in one process with length-grouped batches only (not this run)")
        return None
    return TrainingCheckpoints(Path(cfg.cache.dir) / "checkpoints" / key, every)
