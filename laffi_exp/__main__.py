"""``python -m laffi_exp [overrides]``: one run (or a ``-m`` sweep) composed from ``laffi_exp/conf/``."""

from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from laffi_exp import distributed
from laffi_exp.core.config import CONF_DIR
from laffi_exp.core.errors import AnnotationError, ConfigError

log = logging.getLogger("laffi_exp")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _task(cfg: DictConfig) -> float:
    return run_or_exit(cfg).get("test/exact", float("nan"))


def run_or_exit(cfg: DictConfig) -> dict:
    """``pipeline.run(cfg)``; a bad input (config, data, model files, human files) ends as one ``error:``
    line on stderr and exit code 2, never a traceback. A run stopped by a signal during training (its
    checkpoint written) ends as one ``stopped:`` line and exit code 128 + the signal's number."""
    from laffi_exp.pipeline import run
    from laffi_exp.stages.train_checkpoints import Preempted

    try:
        return run(cfg)
    except Preempted as stop:  # SIGTERM/SIGUSR1/SIGUSR2 during training: the checkpoint is written
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signum) from None
    except InstantiationException as err:  # a class in the config refused its arguments
        cause = err.__cause__
        text = str(cause) if isinstance(cause, ConfigError) else str(err).strip().splitlines()[0]
        print(f"error: {text}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (ConfigError, AnnotationError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OmegaConfBaseException as err:  # e.g. an interpolation to a value that was never set
        print(f"error: config: {str(err).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main() -> None:
    try:
        join_launched_ranks()
        _task()
        distributed.barrier()  # no rank tears the group down while another still uses it (or its store)
    finally:
        distributed.shutdown()


def join_launched_ranks() -> None:
    """Under torchrun or srun every rank runs this command: the process group starts before Hydra, so
    that all ranks name their run dir after rank 0's start time, and Hydra writes nothing for ranks > 0
    (no ``.hydra/`` copy, logs to the console alone; Lightning does the same for the ranks it starts)."""
    distributed.init()
    if distributed.world_size() == 1:
        return
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        if distributed.is_main():
            print(
                "error: a sweep (-m) is not run under torchrun/srun: launch one distributed run per cell",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(2)
    os.environ[distributed.RUN_TIME_ENV] = distributed.from_main(time.strftime(distributed.RUN_TIME_FORMAT))
    if not distributed.is_main():
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


if __name__ == "__main__":
    main()
