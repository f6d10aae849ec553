"""The annotator interface: what the hybrid annotation (``feedback.hybrid``) asks of a feedback source.

Subclass :class:`Annotator` and implement ``annotate``; every other hook has a default that does
nothing, so a source overrides only what it needs (a human file checks its rows, an LLM annotator
batches its requests and takes the run's human feedback as few-shot examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from laffi_exp.core.records import Answer, QAExample


class Annotator:
    """Gives natural-language feedback on one predicted answer."""

    name: str = "annotator"
    source: str = "synthetic"  # "human" or "synthetic": the pool it fills

    def check(self) -> None:
        """Before any model work: read a file, reach an endpoint; raise a ConfigError naming what is wrong."""

    def check_against(self, examples: Sequence[QAExample], answers: Sequence[Answer], human_ids: set[str]) -> Any:
        """A human file: which of the chosen ``human_ids`` it cannot annotate (a ``HumanFileCheck`` with
        a ``fallback`` list), or None where every chosen example is annotated."""
        return None

    def time_report(self, ids: Sequence[str]) -> dict[str, Any] | None:
        """Time per example spent by the annotators of ``ids``, where the source records it."""
        return None

    def prepare(self, shots: Sequence[tuple[QAExample, str, str]]) -> None:
        """Before a synthetic batch: the run's human (example, prediction, feedback) items, e.g. as shots."""

    def annotate(self, ex: QAExample, prediction: str) -> str:
        raise NotImplementedError

    def annotate_many(self, items: Sequence[tuple[QAExample, str]]) -> list[str]:
        """The feedback texts for many (example, prediction) pairs, in order (a batching source overrides it)."""
        return [self.annotate(ex, prediction) for ex, prediction in items]

    def annotator_for(self, example_id: str) -> str:
        """Who annotated one example (a human file names a person per row)."""
        return self.name
