"""Runs as one process per rank (``torchrun`` or SLURM's ``srun``): the process group, started before
any stage; who does what (every rank generates its share, rank 0 alone writes); and the collectives.

Without a launcher the world is one process and every helper does the plain single-process thing.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from laffi_exp.core.errors import ConfigError

# Rank 0's start time, read by laffi_exp/conf/hydra/default.yaml: every rank runs Hydra, and a run dir named
# after each rank's own clock could differ by a second between ranks.
RUN_TIME_ENV = "LAFFI_RUN_TIME"
RUN_TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"  # the format of hydra.run.dir's ${now:...}
# Other ranks at times wait while rank 0 alone works (an LLM annotator, another job's cache entry
# lock); torch's default of 30 minutes would end such a run.
TIMEOUT = timedelta(hours=6)


def cluster_environment():
    """Lightning's environment for this launch, looked up in Lightning's own order (SLURM, then
    torchrun), so the group started here is the one Lightning expects; None for a single process."""
    if "SLURM_NTASKS" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        return None  # the common case, without importing Lightning
    from pytorch_lightning.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for environment in (SLURMEnvironment, TorchElasticEnvironment):
        if environment.detect():
            return environment()
    return None


def init() -> None:
    """Start the process group when a launcher started several ranks. Lightning's DDP and FSDP
    strategies then use it as it is (``_init_dist_connection`` returns early when
    ``torch.distributed.is_initialized()``), so stage 1 can shard generation before any ``fit``."""
    if dist.is_initialized():
        return
    env = cluster_environment()
    if env is None or env.world_size() <= 1:
        return
    backend = "gloo"
    # CUDA tensors (training) go through NCCL, Python objects (results, decisions) through gloo on the
    # CPU. Only when every local rank has a GPU of its own, so that all ranks choose alike.
    if torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
        torch.cuda.set_device(env.local_rank())
        backend = "cpu:gloo,cuda:nccl"
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    dist.init_process_group(backend, rank=env.global_rank(), world_size=env.world_size(), timeout=TIMEOUT)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    """This rank's index on its node (which GPU it uses)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one rank that writes files, logs results and holds cache locks."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it may build or download into a shared cache), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj``, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` run by rank 0 alone; its result, or the exception it raised, on every rank (so no rank
    is left waiting for a rank that failed)."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    error = None
    outcome: tuple[bool, Any] | None = None
    if is_main():
        try:
            outcome = (True, fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - passed on to the other ranks, then raised here too
            error = err
            outcome = (False, err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}"))
    ok, value = from_main(outcome)
    if error is not None:
        raise error
    if not ok:
        raise value
    return value


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001
        return False
    return True


def check_agree(name: str, value: Any) -> None:
    """Every rank has the same ``value`` (e.g. the run dir), or every rank raises a ConfigError."""
    if world_size() == 1:
        return
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise ConfigError(f"{name}: the ranks disagree ({shown}); give it explicitly, the same for every rank")


# -- sharded work -----------------------------------------------------------------------------------
def my_share(batches: Sequence[Sequence[int]]) -> list[int]:
    """This rank's share of batched work: whole batches, batch b to rank b % world size. A batch is
    then exactly the batch a single process forms (same prompts, same padding), so greedy outputs
    are the same whatever the number of ranks, and cache entries are shared between both."""
    return [i for batch in batches[rank() :: world_size()] for i in batch]


def place(shards: Sequence[tuple[Sequence[int], Sequence[Any]]], n: int) -> list[Any]:
    """Each shard's results put back at their indices: ``shards`` holds every rank's (indices, results)."""
    missing = object()
    out: list[Any] = [missing] * n
    for indices, results in shards:
        if len(indices) != len(results):
            raise ValueError(f"a shard has {len(indices)} indices but {len(results)} results")
        for i, result in zip(indices, results):
            if out[i] is not missing:
                raise ValueError(f"index {i} comes from two shards")
            out[i] = result
    holes = [i for i, r in enumerate(out) if r is missing]
    if holes:
        raise ValueError(f"no shard holds indices {holes[:5]}{' ...' if len(holes) > 5 else ''} of {n}")
    return out


def gather_in_order(indices: Sequence[int], results: Sequence[Any], n: int) -> list[Any]:
    """Every rank's ``results`` (for ``indices`` of ``n`` items), gathered on every rank in item order."""
    if world_size() == 1:
        return place([(indices, results)], n)
    shards: list[Any] = [None] * world_size()
    dist.all_gather_object(shards, (list(indices), list(results)))
    return place(shards, n)


def generation_device(accelerator: str = "cpu") -> torch.device:
    """Where generation runs: this rank's GPU when the trainer uses GPUs (``trainer.accelerator``) and one
    is there, else the CPU."""
    if str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")
