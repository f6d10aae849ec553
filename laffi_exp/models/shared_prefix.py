"""Prompts that share a long prefix (the questions on one SQuAD passage: instruction, shots and passage
are the same tokens) read it once: the prefix's keys and values are computed once per batch and given
to every prompt of its group, so only the rest of each prompt is run through the model.

A batch's layout, row by row: ``[pad | shared prefix | pad | rest of the prompt]``. The attention mask
marks the pads, and positions count real tokens only, so every prompt sees what it would see alone.
Which prompts share is said by the caller (``groups``: e.g. the passage); how much they share is the
longest common token prefix of the group's own tokenizations, so nothing is assumed about the tokenizer.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Sequence

import torch

from laffi_exp.models.head import output_head_at
from laffi_exp.models.padding import pad

MIN_SHARED = 16  # tokens: a shorter common prefix is not worth a second forward pass


def shared_lengths(
    ids: Sequence[Sequence[int]], groups: Sequence[Hashable] | None, min_shared: int = MIN_SHARED
) -> list[int]:
    """For each prompt, how many leading tokens it shares with the other prompts of its group (0: none;
    a group of None is no group). At least one token of every prompt is left over (its last position
    gives the next-token logits)."""
    shared = [0] * len(ids)
    if groups is None:
        return shared
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(groups):
        if key is not None:
            members.setdefault(key, []).append(i)
    for rows in members.values():
        if len(rows) < 2:
            continue
        first, n = ids[rows[0]], min(len(ids[i]) for i in rows) - 1
        for i in rows[1:]:
            n = next((k for k in range(n) if ids[i][k] != first[k]), n)
        if n >= min_shared:
            for i in rows:
                shared[i] = n
    return shared


def plan(
    ids: Sequence[Sequence[int]], shared: Sequence[int], groups: Sequence[Hashable] | None, batch_size: int
) -> list[list[int]]:
    """Batches of prompt indices: sorted by (shared prefix length, group, length of the rest), then cut every
    ``batch_size``, so a group's prompts sit together and lengths in a batch are alike. A set of whole
    batches, planned again, gives the same batches (what sharding batches across ranks relies on)."""

    def key(i: int):
        return (shared[i], str(groups[i]) if shared[i] else "", len(ids[i]) - shared[i], i)

    order = sorted(range(len(ids)), key=key)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``rows`` left-padded to the longest, on ``device``."""
    ids, mask = pad(rows, pad_id, left=True)
    return ids.to(device), mask.to(device)


def cache_kwarg(model) -> str:
    """The forward/generate keyword for a KV cache: ``cache`` since transformers 5.24, ``past_key_values`` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (pads, wherever they are, take no position)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def prefix_batch(model, ids: Sequence[Sequence[int]], shared: Sequence[int], batch: Sequence[int], pad_id: int):
    """The cached keys and values of the shared prefixes of ``batch`` (each distinct prefix computed once,
    then one row per prompt), and every row's remaining tokens: (cache, prefix ids, prefix mask, rests).
    A prompt that shares nothing keeps its first token as its prefix (so no row of the prefix pass is empty)."""
    device = next(model.parameters()).device
    cut = [max(shared[i], 1) for i in batch]
    distinct: dict[tuple[int, ...], int] = {}
    row_of = [distinct.setdefault(tuple(ids[i][:k]), len(distinct)) for i, k in zip(batch, cut)]
    prefixes = list(distinct)
    p_ids, p_mask = left_pad(prefixes, pad_id, device)
    with output_head_at(model, torch.zeros_like(p_mask, dtype=torch.bool)):  # no logit is read here
        out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=positions(p_mask), use_cache=True)
    cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    index = torch.tensor(row_of, device=device)
    cache.batch_select_indices(index)
    return cache, p_ids[index], p_mask[index], [list(ids[i][k:]) for i, k in zip(batch, cut)]
