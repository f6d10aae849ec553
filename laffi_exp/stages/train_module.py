"""Stage 3's model: a LightningModule wrapping a transformers causal LM in a ``peft`` LoRA adapter.

The output head runs only at the positions whose next token carries loss (``output_head_at``): with a
262k-entry vocabulary a (batch x length x vocabulary) logits tensor is gigabytes, and the head would
take most of a step.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only

from laffi_exp.models.head import output_head_at
from laffi_exp.stages.train_data import IGNORE_INDEX

log = logging.getLogger(__name__)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, length) mask of the positions whose logits predict a target token (the next label)."""
    return torch.nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


def target_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of ``batch``, the output head run at their positions only:
    the model's own ``loss`` for the same batch, without its (batch x length x vocabulary) logits."""
    labels = batch["labels"]
    with output_head_at(model, target_positions(labels)):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][labels[:, 1:] != IGNORE_INDEX])


@torch.no_grad()
def head_at_targets_works(model, batch: dict[str, torch.Tensor]) -> bool:
    """Whether ``output_head_at`` gives ``model``'s own logits on the first row of ``batch`` (a model whose
    code after the head needs every position would not): checked once before training, in eval mode."""
    was_training = model.training
    model.eval()
    row = {k: v[:1] for k, v in batch.items()}
    try:
        full = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"], use_cache=False).logits
        positions = target_positions(row["labels"])
        with output_head_at(model, positions):
            picked = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"], use_cache=False).logits
        return picked.shape == full[positions].shape and torch.allclose(
            picked.float(), full[positions].float(), rtol=1e-3, atol=1e-4
        )
    except Exception as err:  # noqa: BLE001 - any failure means: compute the full logits instead
        log.warning(
            "The output head at target positions fails for %s (%s): computing full logits", type(model).__name__, err
        )
        return False
    finally:
        model.train(was_training)


class HistoryLogger(Logger):
    """Keeps every logged metric row in memory (``rows``: step and metrics), so that a cached
    training run can replay its loss curves to a later run's loggers."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append({"step": step, "metrics": {k: float(v) for k, v in metrics.items()}})


def micro_batches(batch: dict[str, torch.Tensor], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut into consecutive groups of rows, each at most ``max_tokens`` tokens once padded to its
    own longest row (a row longer than that is a group of its own), right padding trimmed."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    groups, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and (end + 1 - start) * max(lengths[start : end + 1]) <= max_tokens:
            end += 1
        width = max(lengths[start:end])
        groups.append({k: v[start:end, :width] for k, v in batch.items()})
        start = end
    return groups


class LoRAFineTuner(pl.LightningModule):
    """A causal LM with a LoRA adapter; only adapter weights train. AdamW with linear warm-up and
    cosine decay over the run's optimizer steps.

    With ``micro_batch_tokens`` each training batch is run as micro-batches of at most that many tokens,
    their gradients summed before the optimizer step: the memory of a micro-batch, the gradient of the
    whole batch (its mean loss over target tokens, up to float rounding). One process only: under DDP
    each backward would all-reduce (use a smaller ``method.batch_size`` per rank there)."""

    def __init__(
        self,
        model,
        lora_config,
        optimizer: Callable,
        warmup_ratio: float = 0.1,
        head_at_targets: bool = True,
        micro_batch_tokens: int | None = None,
    ):
        super().__init__()
        from peft import get_peft_model

        self.model = get_peft_model(model, lora_config)
        self.optimizer_factory = optimizer
        self.warmup_ratio = warmup_ratio
        self.head_at_targets: bool | None = None if head_at_targets else False  # None: checked on the first batch
        self.micro_batch_tokens = micro_batch_tokens
        self.strict_loading = False  # checkpoints hold the adapter alone, never the frozen base
        self._resumed_rng: dict[str, Any] | None = None

    def forward(self, **batch):
        return self.model(**batch)

    def loss(self, batch) -> torch.Tensor:
        if self.head_at_targets is None:
            self.head_at_targets = head_at_targets_works(self.model, batch)
        if self.head_at_targets:
            return target_loss(self.model, batch)
        return self.model(**batch).loss

    def training_step(self, batch, batch_idx):
        parts = micro_batches(batch, self.micro_batch_tokens) if self.micro_batch_tokens else [batch]
        accumulate = self.trainer.accumulate_grad_batches  # Lightning divides the returned loss by it
        if self.micro_batch_tokens and batch_idx % accumulate == 0:
            self.optimizers().zero_grad()  # what Lightning would do after this step (optimizer_zero_grad is off)
        if len(parts) == 1:
            loss = self.loss(batch)
        else:  # all but the last part go backward here; Lightning takes the last one's like any loss
            n_target = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            share = [int((p["labels"][:, 1:] != IGNORE_INDEX).sum()) / n_target for p in parts]
            done = torch.zeros((), device=batch["input_ids"].device)
            for part, w in zip(parts[:-1], share[:-1]):
                piece = self.loss(part) * w
                self.trainer.strategy.backward(piece / accumulate, None)
                done = done + piece.detach()
            last = self.loss(parts[-1]) * share[-1]
            loss = last + done  # the batch's mean loss; only ``last`` carries a graph
        self.log(
            "train/loss",
            loss.detach() if len(parts) > 1 else loss,
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            batch_size=batch["input_ids"].shape[0],
        )
        return loss

    # -- checkpoints (TrainingCheckpoints): the adapter, the loss history and the random state ----------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["laffi_history"] = [
            row for lg in self.trainer.loggers if isinstance(lg, HistoryLogger) for row in lg.rows
        ]
        checkpoint["laffi_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        if set(checkpoint["state_dict"]) != trainable:
            raise RuntimeError("the training checkpoint does not hold this run's adapter weights")
        for lg in self.trainer.loggers:
            if isinstance(lg, HistoryLogger):
                lg.rows = list(checkpoint.get("laffi_history", []))
        self._resumed_rng = checkpoint.get("laffi_rng")

    def on_train_batch_start(self, batch, batch_idx):
        if self._resumed_rng is not None:  # the first step of a resumed run: as the interrupted run had it
            set_rng_state(self._resumed_rng)
            self._resumed_rng = None
            # Lightning counts the restored step once more when a checkpoint was not written at a batch's
            # end; the loggers' step is the optimizer step, as in the uninterrupted run
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        if not self.micro_batch_tokens:  # else training_step zeroed them before its first micro-batch
            optimizer.zero_grad()

    def validation_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.warmup_ratio * total))

        # Not transformers.get_cosine_schedule_with_warmup: its warm-up gives step 0 a learning rate of 0 (a
        # step that trains nothing) where this one gives 1/warmup; switching would change every trained adapter.
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``trainer.gradient_clip_val`` under every strategy. Under FSDP each rank holds a shard of the
        gradients: the norm is the sharded module's, over all ranks (Lightning refuses norm clipping there)."""
        from pytorch_lightning.strategies import FSDPStrategy

        if (
            gradient_clip_val
            and isinstance(self.trainer.strategy, FSDPStrategy)
            and gradient_clip_algorithm in (None, "norm")
        ):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def save_adapter(peft_model, folder: Path) -> None:
    """``save_pretrained`` of the adapter, with ``adapter_config.json`` the same in every process (peft
    writes its module-name sets in hash order, which changes from one Python process to the next)."""
    peft_model.save_pretrained(folder, safe_serialization=True)
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in config.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            config[key] = sorted(value)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def rng_state() -> dict[str, Any]:
    """The global random state (python, numpy, torch CPU and CUDA), in types a checkpoint loads safely."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
