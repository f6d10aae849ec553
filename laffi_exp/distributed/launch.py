"""The launch of a distributed run, checked before any stage: every rank joins the process group, writes
to the same run dir, and Lightning's trainer counts as many processes as were launched."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from laffi_exp import distributed
from laffi_exp.core.errors import ConfigError

log = logging.getLogger(__name__)


def join_ranks(cfg: DictConfig, in_sweep: bool) -> None:
    """Join the other ranks of a torchrun/srun launch (nothing in a single process), and check the
    launch against the trainer: Lightning must find all its ranks running, as it would start missing
    ones itself only at ``fit`` (after stage 1), and every rank must write to the same run dir.
    ``in_sweep``: this process is a job of a Hydra multirun."""
    distributed.init()
    world = distributed.world_size()
    if cfg.model.get("micro_batch_tokens") and world > 1:
        raise ConfigError(
            "model.micro_batch_tokens: micro-batches run in one process only; under DDP/FSDP set "
            "model.micro_batch_tokens=null and size method.batch_size per rank"
        )
    if world > 1:
        if in_sweep:
            raise ConfigError(
                "hydra.mode: a sweep is not run under torchrun/srun (each job would start a sweep); "
                "launch one distributed run per cell"
            )
        log.info("Distributed run: rank %d of %d (%s)", distributed.rank(), world, torch.distributed.get_backend())
        distributed.check_agree("paths.output_dir (hydra.run.dir)", str(Path(cfg.paths.output_dir).resolve()))
        start_method = OmegaConf.select(cfg, "trainer.strategy.start_method", default="popen")
        if start_method != "popen":
            raise ConfigError(
                "trainer.strategy.start_method: every rank is a process already (launched by torchrun or srun); "
                f"expected popen, got {start_method!r}"
            )
    elif "strategy" not in cfg.trainer:
        return  # one process, one device
    # Lightning's own count (devices=-1, auto, ...), from a trainer that sets no torch flag and whose
    # device lines are not shown (the trainer that fits shows them).
    quiet = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        trainer = instantiate(cfg.trainer, logger=False, deterministic=None, benchmark=None)
    finally:
        quiet.setLevel(level)
    processes = trainer.num_devices * trainer.num_nodes  # (trainer.world_size is the launcher's, under one)
    if processes != world:
        raise ConfigError(
            f"trainer: runs {processes} processes (devices x num_nodes) but {world} were launched; every "
            "stage runs on every rank, so launch them all at the start: "
            f"torchrun --nproc_per_node={trainer.num_devices} "
            f"--nnodes={trainer.num_nodes} -m laffi_exp ... (or srun under SLURM; see laffi_exp/conf/trainer/ddp.yaml)"
        )
