"""Stage 3's resume points: Lightning checkpoints of the adapter, optimizer, loops and data position
every ``cache.checkpoint_every`` steps, and the stop signals that write one before a preemption."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from laffi_exp.core.io import write_json

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Training stopped by a signal (SIGTERM, SIGUSR1, SIGUSR2: what SLURM sends before it preempts or
    times a job out) after writing a checkpoint; the same command resumes it."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        where = (
            f"checkpoint {path}: the same command resumes it"
            if path
            else "no checkpoint yet: the same command starts it again"
        )
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
