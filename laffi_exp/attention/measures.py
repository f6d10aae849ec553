"""The attention measures: pure functions from one sequence's attention weights (heads x queries x keys)
and its segment masks to per-head statistics. Each definition here is the README's ("Attention analysis").

For a query at position i (0-based; the first token is position 0) the weights a_ij over the keys
j = 0..i sum to 1. The first token is the **attention sink**: models park attention there when nothing
else is wanted, so every measure but ``sink`` and ``entropy`` leaves it out, and
``sink + template + context + question + prediction = 1`` for every query.

- ``local``: sum of a_ij over keys 1 <= j with i - j < w (the query itself and the w - 1 tokens before it).
- ``far``: sum of a_ij over keys 1 <= j with i - j > T (farther than T tokens).
- ``distance``: mean distance of the attention off the sink, sum_{j>=1} a_ij (i - j) / sum_{j>=1} a_ij.
- ``entropy``: -sum_j a_ij ln a_ij over all keys j <= i, in nats (0 for a one-hot row).
- ``sink``: a_i0.
- ``template``, ``context``, ``question``, ``prediction``: sum of a_ij over the segment's tokens (the
  template is every token that is no field of the prompt, the sink apart).
- ``gold``: sum of a_ij over the tokens of the gold answer span inside the context (a part of ``context``);
  undefined (NaN) when the question has no answer or its span is not in the (shortened) context.

Two sets of query rows (``SCOPES``): ``all`` averages each measure over the queries i = 1..n-1 (query 0
can only attend to itself); ``gen`` is the row of the last prompt token, whose logits produce the first
generated token: what the model looks at when it decides its answer (or its feedback). A segment a
query cannot see yet counts 0 for it. A measure that is undefined for a row (``distance`` with all the
mass on the sink) is left out of that row set's mean.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

SEGMENTS = ("template", "context", "question", "prediction", "gold")
MEASURES = ("local", "far", "distance", "entropy", "sink", *SEGMENTS)
SCOPES = ("all", "gen")


def row_measures(
    attn: torch.Tensor, masks: Mapping[str, torch.Tensor], window: int, far: int
) -> dict[str, torch.Tensor]:
    """Every measure of every query row: ``attn`` is (heads, n, n) causal weights, ``masks`` a (n,) bool
    tensor per segment of ``SEGMENTS`` (absent or all False: the segment is not in the prompt).
    Returns a (heads, n) tensor per name of ``MEASURES``; NaN where a measure is undefined."""
    heads, n, _ = attn.shape
    a = attn.float()
    pos = torch.arange(n, device=a.device)
    dist = pos[:, None] - pos[None, :]  # (n, n): i - j, the query's distance to each key
    off_sink = (dist >= 0) & (pos[None, :] >= 1)
    out = {
        "local": (a * (off_sink & (dist < window))).sum(-1),
        "far": (a * (off_sink & (dist > far))).sum(-1),
        "entropy": torch.special.entr(a).sum(-1),
        "sink": a[..., 0],
    }
    off_mass = (a * off_sink).sum(-1)
    out["distance"] = torch.where(off_mass > 0, (a * (off_sink * dist)).sum(-1) / off_mass, torch.nan)
    for name in SEGMENTS:
        mask = masks.get(name)
        if mask is None or not bool(mask[1:].any()):
            out[name] = torch.full((heads, n), torch.nan, device=a.device)
            continue
        keys = mask.to(device=a.device, dtype=a.dtype).clone()
        keys[0] = 0.0  # the sink is counted apart
        out[name] = a @ keys
    return {name: out[name] for name in MEASURES}


def head_measures(attn: torch.Tensor, masks: Mapping[str, torch.Tensor], window: int, far: int) -> torch.Tensor:
    """Per-head statistics of one sequence: a (len(SCOPES), len(MEASURES), heads) tensor, scope ``all``
    (the mean over query rows 1..n-1, undefined rows left out) then ``gen`` (the last row)."""
    rows = row_measures(attn, masks, window, far)
    stacked = torch.stack([rows[name] for name in MEASURES])  # (measures, heads, n)
    return torch.stack([stacked[..., 1:].nanmean(-1), stacked[..., -1]])
