"""Batched inference on a causal LM: greedy generation (left padding, KV cache, stop at a newline; the
questions on one passage read it once) and the log-likelihood of continuations. What every stage that
runs the model uses (answers, reflections, no-answer probabilities, LLM annotators)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from tqdm.auto import tqdm

from laffi_exp.models import shared_prefix
from laffi_exp.models.head import output_head_at


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    max_prompt_tokens: int | None = None,
    desc: str = "generate",
    groups: Sequence[Hashable] | None = None,
    shared: Sequence[int] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, in order; stops at EOS or at the end of the first line.
    Batches hold prompts of similar length (``batches``), left-padded. Prompts of one group (``groups[i]``,
    e.g. their passage) read their common token prefix once (``laffi_exp.models.shared_prefix``);
    ``shared`` gives its length per prompt where a caller planned the batches (``batches``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    ids = _tokenize(tokenizer, prompts, max_prompt_tokens)
    shared = list(shared) if shared is not None else shared_prefix.shared_lengths(ids, groups)
    out: list[str] = [""] * len(prompts)
    newline_ids = _newline_ids(tokenizer)
    stop = [tokenizer.eos_token_id, *newline_ids] if newline_ids else tokenizer.eos_token_id
    try:
        for batch in tqdm(shared_prefix.plan(ids, shared, groups, batch_size), desc=desc, leave=False, mininterval=2):
            extra = {}
            if any(shared[i] for i in batch):
                cache, p_ids, p_mask, rests = shared_prefix.prefix_batch(model, ids, shared, batch, pad_id)
                r_ids, r_mask = shared_prefix.left_pad(rests, pad_id, device)
                input_ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
                extra[shared_prefix.cache_kwarg(model)] = cache
            else:
                input_ids, mask = shared_prefix.left_pad([ids[i] for i in batch], pad_id, device)
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad_id,
                eos_token_id=stop,
                **extra,
            )
            texts = tokenizer.batch_decode(gen[:, input_ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                out[i] = text
    finally:
        model.train(was_training)
    return out


def _tokenize(tokenizer, prompts: Sequence[str], max_prompt_tokens: int | None = None) -> list[list[int]]:
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if max_prompt_tokens is not None:  # as the tokenizer truncates: the end is cut
        side = getattr(tokenizer, "truncation_side", "right")
        ids = [r[:max_prompt_tokens] if side == "right" else r[-max_prompt_tokens:] for r in ids]
    return ids


@torch.inference_mode()
def sequence_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 32,
    groups: Sequence[Hashable] | None = None,
    shared: Sequence[int] | None = None,
) -> list[float]:
    """Sum of the log-probabilities of the tokens of ``continuations[i]`` given ``prompts[i]``
    (teacher forcing), in input order.

    Tokenized as training does (``laffi_exp.stages.train.encode_pair``, without the EOS): the prompt with
    special tokens, the continuation without, concatenated. Batches as ``generate`` forms them (prompts
    of one group read their common prefix once), left-padded; the output head only at the scored
    positions; log-softmax in float32 (or wider). Raises ValueError when the two lists differ in length
    or a prompt or continuation has no tokens.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations: lengths must match")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not prompts:
        return []
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    cont_ids = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    for i, (p_ids, c_ids) in enumerate(zip(prompt_ids, cont_ids)):
        if not c_ids:
            raise ValueError(f"continuation {i} ({continuations[i]!r}) tokenizes to zero tokens")
        if not p_ids:
            # Nothing to condition the first continuation token on.
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenizes to zero tokens")

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # The prefix shared by a group is the prompts' (the same batches as their generation).
    shared = list(shared) if shared is not None else shared_prefix.shared_lengths(prompt_ids, groups)
    full = [p + c for p, c in zip(prompt_ids, cont_ids)]
    out: list[float] = [0.0] * len(prompts)
    try:
        for batch in tqdm(
            shared_prefix.plan(prompt_ids, shared, groups, batch_size), desc="logprobs", leave=False, mininterval=2
        ):
            extra, start = {}, [0] * len(batch)
            if any(shared[i] for i in batch):
                cache, p_ids, p_mask, rests = shared_prefix.prefix_batch(model, full, shared, batch, pad_id)
                start = [max(shared[i], 1) for i in batch]
                extra[shared_prefix.cache_kwarg(model)] = cache
            else:
                p_mask, rests = None, [full[i] for i in batch]
            r_ids, r_mask = shared_prefix.left_pad(rests, pad_id, device)
            mask = r_mask if p_mask is None else torch.cat([p_mask, r_mask], 1)
            # scored[b, t]: the token at t + 1 is a continuation token, predicted by the logits at t.
            scored = torch.zeros_like(r_mask, dtype=torch.bool)
            width = r_ids.shape[1]
            for b, i in enumerate(batch):
                offset = width - len(rests[b])  # where row b's tokens begin (left padding)
                first = len(prompt_ids[i]) - 1 - start[b]  # the last prompt token, in the rest
                scored[b, offset + first : width - 1] = True
            targets = torch.nn.functional.pad(r_ids[:, 1:], (0, 1), value=pad_id)[scored]
            with output_head_at(model, scored):  # (n continuation tokens, vocab), not (batch, width, vocab)
                logits = model(
                    input_ids=r_ids,
                    attention_mask=mask,
                    position_ids=shared_prefix.positions(mask)[:, -width:],
                    use_cache=bool(extra),
                    **extra,
                ).logits
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            token_lp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            row = torch.arange(len(batch), device=device).unsqueeze(1).expand_as(scored)[scored]
            sums = torch.zeros(len(batch), dtype=token_lp.dtype, device=device).index_add_(0, row, token_lp)
            for b, i in enumerate(batch):
                out[i] = float(sums[b])
    finally:
        model.train(was_training)
    return out


def batches(
    tokenizer, prompts: Sequence[str], batch_size: int, groups: Sequence[Hashable] | None = None
) -> tuple[list[list[int]], list[int]]:
    """The batches of prompt indices that ``generate`` (and ``sequence_logprobs``) form, and how many
    tokens each prompt shares with its group. Given back to them (``shared``) for a subset of whole
    batches, they form exactly those batches again (a rank's share of a distributed run)."""
    ids = _tokenize(tokenizer, prompts)
    shared = shared_prefix.shared_lengths(ids, groups)
    return shared_prefix.plan(ids, shared, groups, batch_size), shared


def _newline_ids(tokenizer) -> list[int]:
    """Token ids that are exactly a newline, used as extra stop tokens (answers are one line)."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return ids if len(ids) == 1 else []
