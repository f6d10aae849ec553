"""``python -m laffi_exp [overrides]``: one run (or a ``-m`` sweep) composed from ``conf/``."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from laffi_exp.config import CONF_DIR
from laffi_exp.errors import AnnotationError, ConfigError

log = logging.getLogger("laffi_exp")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _task(cfg: DictConfig) -> float:
    from laffi_exp.pipeline import run

    try:
        metrics = run(cfg)
    except InstantiationException as err:  # a class in the config refused its arguments
        cause = err.__cause__
        text = str(cause) if isinstance(cause, ConfigError) else str(err).strip().splitlines()[0]
        print(f"error: {text}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    except (ConfigError, AnnotationError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    except OmegaConfBaseException as err:  # e.g. an interpolation to a value that was never set
        print(f"error: config: {str(err).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return metrics.get("test/exact", float("nan"))


def main() -> None:
    _task()


if __name__ == "__main__":
    main()
