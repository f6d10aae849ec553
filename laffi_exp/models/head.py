"""The output head at chosen positions only: with a 262k-entry vocabulary, the logits of every position
of a batch are gigabytes and the head takes most of the compute, yet training reads them only where a
target token is predicted and likelihoods only where a continuation token is scored."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def output_head_at(model, positions: torch.Tensor):
    """Within this context ``model``'s output head (``get_output_embeddings()``) runs only on the hidden
    states at ``positions`` (a (batch, length) bool mask), so ``model(...).logits`` is (n, vocab) for the n
    True positions, in row-major order. The model's own forward still runs whole: its code after the
    head (logit soft-capping, scaling) applies, and so do peft's and FSDP's hooks."""
    head = model.get_output_embeddings()

    def gather(module, args):
        return (args[0][positions], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
