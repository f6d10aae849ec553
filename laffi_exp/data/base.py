"""The data-source interface: what set-up asks of a ``dataset`` config's ``_target_``."""

from __future__ import annotations

from laffi_exp.core.errors import ConfigError

SIZE_KEYS = {"train": "num_train", "validation": "num_val", "test": "num_eval"}


def check_sizes(sizes: dict[str, int]) -> None:
    """Each split size must be a positive integer; the error names the config key."""
    for split, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"dataset.{SIZE_KEYS[split]}: expected a positive integer, got {n!r}")


class DataSource:
    """Questions in SQuAD JSON layout, split into train, validation and test.

    ``name`` names the source in example ids and results; ``sizes`` maps each split to its number of
    questions (the config's ``num_train``, ``num_val``, ``num_eval``).
    """

    name: str
    sizes: dict[str, int]

    def check(self) -> None:
        """Cheap checks before any heavy work (sizes, files present, settings); a ConfigError names the key."""
        check_sizes(self.sizes)

    def splits(self) -> dict[str, dict]:
        """``{"train": squad_json, "validation": ..., "test": ...}``, each a SQuAD JSON object (``data`` list)."""
        raise NotImplementedError
