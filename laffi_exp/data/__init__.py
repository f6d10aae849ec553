"""Dataset sources: the embedded synthetic generator and SQuAD-layout JSON files.

Every source has ``name``, ``sizes`` (split -> number of questions), ``check()`` (cheap, before heavy
work) and ``splits()`` (train, validation, test in SQuAD JSON layout).
"""

from laffi_exp.errors import ConfigError

SIZE_KEYS = {"train": "num_train", "validation": "num_val", "test": "num_eval"}


def check_sizes(sizes: dict[str, int]) -> None:
    """Each split size must be a positive integer; the error names the config key."""
    for split, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"dataset.{SIZE_KEYS[split]}: expected a positive integer, got {n!r}")
