"""Stage 3, fine-tuning with LoRA: a LightningDataModule of (prompt, target) pairs with the loss on
target tokens only, and a LightningModule wrapping a transformers causal LM in a ``peft`` adapter.

The output head runs only at the positions whose next token carries loss (``output_head_at``): with a
262k-entry vocabulary a (batch x length x vocabulary) logits tensor is gigabytes, and the head would
take most of a step. Batches group examples of similar length (``LengthGroupedSampler``), so little
of a batch is padding.

``method=laffi`` pairs are (question, context, predicted answer) → feedback; ``method=sft`` pairs are
(question, context) → gold answer. Both use the same examples in the same order, so they compare.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from laffi_exp.io import write_json
from laffi_exp.models.head import output_head_at
from laffi_exp.prompts import Prompter
from laffi_exp.records import Feedback, QAExample

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Pair:
    """One training text: the loss is on ``target`` alone."""

    id: str
    prompt: str
    target: str


def laffi_pairs(examples: Sequence[QAExample], feedback: Sequence[Feedback], prompter: Prompter) -> list[Pair]:
    """Feedback prediction: given question, context and the model's own answer, produce the feedback."""
    by_id = {f.id: f for f in feedback}
    return [
        Pair(ex.id, prompter.feedback_prompt(ex, by_id[ex.id].prediction), prompter.feedback_target(by_id[ex.id].feedback))
        for ex in examples
    ]


def sft_pairs(examples: Sequence[QAExample], feedback: Sequence[Feedback], prompter: Prompter) -> list[Pair]:
    """Supervised fine-tuning on gold answers, with the same answer prompt as evaluation."""
    return [Pair(ex.id, prompter.answer_prompt(ex), prompter.answer_target(ex.gold)) for ex in examples]


def encode_pair(tokenizer, pair: Pair) -> tuple[list[int], list[int]]:
    """Token ids of prompt + target + EOS, and labels that are IGNORE_INDEX over the prompt."""
    prompt = tokenizer(pair.prompt, add_special_tokens=True)["input_ids"]
    target = tokenizer(pair.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


class PairDataset(Dataset):
    def __init__(self, tokenizer, pairs: Sequence[Pair], max_length: int, split: str):
        self.items = []
        dropped = 0
        for pair in pairs:
            ids, labels = encode_pair(tokenizer, pair)
            if len(ids) > max_length:
                dropped += 1
                continue
            self.items.append((ids, labels))
        self.dropped = dropped
        if dropped:
            log.warning("%s: dropped %d of %d examples longer than %d tokens", split, dropped, len(pairs), max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch; padding is masked out of attention and of the loss."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LengthGroupedSampler(Sampler[int]):
    """A seeded shuffle in which consecutive ``batch_size`` indices have similar lengths: each epoch the
    examples are shuffled, cut into groups of ``group`` batches, each group sorted by length (longest
    first) and cut into batches, and the batches shuffled again. Every example is seen once an epoch;
    the order depends only on (seed, epoch) and the lengths."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 32):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.epoch = 0
        self.skip = 0  # indices of the next epoch already trained on (a resumed run): not yielded again

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        size = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        flat = [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]]
        skip, self.skip = self.skip, 0
        yield from flat[skip:]


class PairDataModule(pl.LightningDataModule):
    """Train and validation pairs, tokenized once; the shuffle order comes from ``seed``. With
    ``group_by_length`` the training batches hold examples of similar length (little padding); the
    validation batches are always cut from the pairs sorted by length (their order changes no loss)."""

    def __init__(self, tokenizer, train: Sequence[Pair], val: Sequence[Pair], batch_size: int, max_length: int, seed: int,
                 group_by_length: bool = True):
        super().__init__()
        self.tokenizer = tokenizer
        self.train_set = PairDataset(tokenizer, train, max_length, "train")
        self.val_set = PairDataset(tokenizer, val, max_length, "validation")
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        if len(self.train_set) == 0:
            raise ValueError(f"no training example fits in {max_length} tokens (model.max_length)")

    def _collate(self, batch):
        return collate(batch, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        if self.group_by_length:
            lengths = [len(ids) for ids, _ in self.train_set.items]
            sampler = LengthGroupedSampler(lengths, self.batch_size, self.seed)
            sampler.skip = self.batch_size * self._batches_done_this_epoch()
            # its own generator: making the iterator draws no number from the global random state
            return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate,
                              generator=torch.Generator().manual_seed(self.seed))
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen, collate_fn=self._collate)

    def _batches_done_this_epoch(self) -> int:
        """Training batches of the current epoch done before a checkpoint this run resumes from (0 otherwise):
        checkpoints follow an optimizer step, so the global step counts every batch done."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.global_step == 0:
            return 0
        per_epoch = math.ceil(len(self.train_set) / self.batch_size)
        return trainer.global_step * trainer.accumulate_grad_batches % per_epoch

    def val_dataloader(self) -> DataLoader:
        by_length = sorted(range(len(self.val_set)), key=lambda i: len(self.val_set.items[i][0]))
        return DataLoader(torch.utils.data.Subset(self.val_set, by_length), batch_size=self.batch_size, collate_fn=self._collate)


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
        return picked.shape == full[positions].shape and torch.allclose(picked.float(), full[positions].float(), rtol=1e-3, atol=1e-4)
    except Exception as err:  # noqa: BLE001 - any failure means: compute the full logits instead
        log.warning("The output head at target positions fails for %s (%s): computing full logits", type(model).__name__, err)
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

    def __init__(self, model, lora_config, optimizer: Callable, warmup_ratio: float = 0.1, head_at_targets: bool = True,
                 micro_batch_tokens: int | None = None):
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
        self.log("train/loss", loss.detach() if len(parts) > 1 else loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    # -- checkpoints (TrainingCheckpoints): the adapter, the loss history and the random state ----------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["laffi_history"] = [row for lg in self.trainer.loggers if isinstance(lg, HistoryLogger) for row in lg.rows]
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

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy) and gradient_clip_algorithm in (None, "norm"):
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


# -- Checkpoints and resume ------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The global random state (python, numpy, torch CPU and CUDA), in types a checkpoint loads safely."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


class Preempted(Exception):
    """Training stopped by a signal (SIGTERM, SIGUSR1, SIGUSR2: what SLURM sends before it preempts or
    times a job out) after writing a checkpoint; the same command resumes it."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        where = f"checkpoint {path}: the same command resumes it" if path else "no checkpoint yet: the same command starts it again"
        super().__init__(f"stopped by {signal.Signals(signum).name} at training step {step}; {where}")


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class TrainingCheckpoints(pl.Callback):
    """Lightning checkpoints of a training run every ``every`` optimizer steps, in ``folder``: the adapter
    weights (never the frozen base), optimizer, scheduler, loop and data position, the loss history and the
    random state. One file, ``last.ckpt``, written to a temp file and renamed, so a kill at any moment
    leaves the previous checkpoint whole (``last.json`` says its step). Step N's checkpoint is written as
    step N + 1 begins: after step N's validation and logging, so that a run resumed from it repeats
    nothing and misses nothing. A stop signal during training writes one at the next step and raises
    ``Preempted``.

    ``resume_from`` is the checkpoint to start ``fit`` from, if one is there. The position in the data
    comes back through ``PairDataModule`` (the global step counts the batches done) and the random state
    through ``LoRAFineTuner``: a resumed run trains exactly as the uninterrupted one."""

    def __init__(self, folder: str | Path, every: int):
        self.folder = Path(folder)
        self.every = every
        self._saved_step = 0
        self._signal: int | None = None
        self._handlers: dict[int, Any] = {}

    @property
    def path(self) -> Path:
        return self.folder / "last.ckpt"

    def resume_from(self) -> str | None:
        return str(self.path) if self.path.is_file() else None

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_step = trainer.global_step  # a resumed run does not write its starting point again
        self._signal = None
        self._handlers = {}
        if threading.current_thread() is threading.main_thread():  # (Lightning restores its own at teardown)
            for signum in STOP_SIGNALS:
                self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum  # acted on where the state is whole: as the next step begins

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._saved_step and (self._signal is not None or (self.every > 0 and step % self.every == 0)):
            self.save(trainer)
        if self._signal is not None:
            self._stop(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._signal is not None:  # it came during the last step: stop all the same (the run was asked to)
            self._stop(trainer)
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def _stop(self, trainer) -> None:
        """After the checkpoint: the handler that was there before runs (under the slurm launcher,
        submitit's SIGUSR2 handler requeues the job and exits); if it returns, training stops here."""
        signum, self._signal = self._signal, None
        previous = self._handlers.get(signum)
        self._restore_handlers()
        if callable(previous):
            previous(signum, None)
        raise Preempted(signum, trainer.global_step, self.path if self.path.is_file() else None)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Written as a batch begins, after Lightning counted it "ready": recorded as before that count,
        # the state Lightning itself saves between two batches, so a resumed run validates on the same steps
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        for count in (progress["total"], progress["current"]):
            if count["ready"] == count["completed"] + 1:
                count["ready"] -= 1

    def save(self, trainer: pl.Trainer) -> None:
        self._saved_step = trainer.global_step
        tmp = self.folder / f"last.ckpt.tmp{os.getpid()}"
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            write_json(self.folder / "last.json", {"step": trainer.global_step, "max_steps": trainer.max_steps})
        trainer.strategy.barrier("laffi_checkpoint")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()


# -- Fully sharded training (trainer=fsdp) -------------------------------------------------------------
# Part of the trained-adapter cache key of FSDP runs: raise it when what FSDP trains changes.
FSDP_SCHEME = 2


def prepare_fsdp(strategy, peft_model, precision: str) -> None:
    """Settings that LoRA under FSDP needs, where ``trainer.strategy`` leaves them unset:

    - units: each transformer block (the classes the model names in ``_no_split_modules``), and each
      LoRA weight on its own. One unit for the whole model would gather every weight in each forward;
      a LoRA weight inside its block's unit would mix dtypes (fp32 adapter, bf16 base: FSDP refuses)
      and give the frozen weights a gradient buffer.
    - every rank starts from rank 0's adapter, as under DDP (FSDP's ``sync_module_states`` needs GPUs).
    - precision as under DDP: ``bf16-mixed``/``16-mixed`` compute in half precision but reduce gradients
      and keep buffers (rotary frequencies) in fp32; ``32-true`` casts nothing. (Lightning's FSDP
      defaults cast every weight, gradient and buffer to the one dtype the precision names.)
    """
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import CustomPolicy

    if strategy.kwargs.get("auto_wrap_policy") is None:
        names = set(getattr(peft_model.get_base_model(), "_no_split_modules", None) or ())
        layers = {type(m) for m in peft_model.modules() if type(m).__name__ in names}
        if not layers:
            log.warning("FSDP: %s names no transformer block class: only the LoRA weights are units of their own", type(peft_model.get_base_model()).__name__)
        log.info("FSDP: one unit per %s and per LoRA weight", ", ".join(sorted(c.__name__ for c in layers)) or "(no block)")
        strategy.kwargs["auto_wrap_policy"] = CustomPolicy(lambda module: type(module) in layers or _trainable_leaf(module))
    if torch.distributed.is_initialized():
        for p in peft_model.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)
    if strategy.mixed_precision is None:
        half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
        if half is not None:
            strategy.mixed_precision = MixedPrecision(param_dtype=half, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
        elif str(precision) == "32-true":  # no casting: a bf16 base computes in bf16 as under DDP (Lightning casts it to fp32)
            strategy.mixed_precision = MixedPrecision()


def _trainable_leaf(module) -> bool:
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(params) and all(p.requires_grad for p in params)


def gather_adapter(strategy, peft_model) -> dict[str, torch.Tensor]:
    """The trained LoRA weights, whole, on every rank (CPU copies, named as in an unwrapped peft model),
    from a model that FSDP has sharded. Every rank must call it (it is a collective). Only the units that
    hold LoRA weights are gathered, one at a time; with another wrapping the whole model is, in host memory."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    trainable = {_unwrapped_name(n) for n, p in peft_model.named_parameters() if p.requires_grad}
    prefix = {id(m): _unwrapped_name(n) for n, m in peft_model.named_modules()}
    adapter = {}
    for unit in FSDP.fsdp_modules(strategy.model):  # the same units in the same order on every rank
        if _trainable_leaf(unit.module):
            with FSDP.summon_full_params(unit, writeback=False):
                for name, p in unit.module.named_parameters():
                    adapter[f"{prefix[id(unit.module)]}.{name}"] = p.detach().to("cpu", copy=True)
    if set(adapter) == trainable:
        return adapter
    offload = strategy.root_device.type != "cpu"
    with FSDP.summon_full_params(strategy.model, writeback=False, offload_to_cpu=offload):
        return {_unwrapped_name(n): p.detach().to("cpu", copy=True) for n, p in peft_model.named_parameters() if p.requires_grad}


def load_adapter(peft_model, adapter: dict[str, torch.Tensor]) -> None:
    """Put gathered adapter weights into a freshly built peft model; every trainable weight must be there."""
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    if trainable != set(adapter):
        raise RuntimeError(
            f"FSDP: the gathered adapter does not match the rebuilt model (missing {sorted(trainable - set(adapter))[:3]}, "
            f"unexpected {sorted(set(adapter) - trainable)[:3]})"
        )
    peft_model.load_state_dict(adapter, strict=False)


def _unwrapped_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


class CPUFSDPStrategy(pl.strategies.FSDPStrategy):
    """Lightning's FSDP on CPU processes (gloo), which Lightning itself refuses: the FSDP code paths
    (sharding, clipping, gathering the adapter) tested without GPUs (``trainer=fsdp_cpu``). Not a way
    to train faster: use ``trainer=ddp_cpu`` for that."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(model, sharding_strategy=self.sharding_strategy, mixed_precision=self.mixed_precision_config,
                         cpu_offload=self.cpu_offload, device_id=torch.device("cpu"), **self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied
        return super()._setup_model(model)  # finds it wrapped: the rest of Lightning's set-up
