"""Token rows padded into one batch tensor, with the attention mask of the real tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad(
    rows: Sequence[Sequence[int]], value: int, left: bool = False, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows as a (batch, width) long tensor filled with ``value`` around them, mask: 1 on their tokens).
    Right padding for training (labels line up with inputs), left padding for generation (every row ends
    where the next token goes). ``width`` defaults to the longest row."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[b, span] = torch.tensor(r, dtype=torch.long)
            mask[b, span] = 1
    return ids, mask
