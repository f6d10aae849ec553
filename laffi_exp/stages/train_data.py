"""Stage 3's data: (prompt, target) pairs with the loss on target tokens only, batched by length.

``method=laffi`` pairs are (question, context, predicted answer) → feedback; ``method=sft`` pairs are
(question, context) → gold answer. Both use the same examples in the same order, so they compare.
Batches group examples of similar length (``LengthGroupedSampler``), so little of a batch is padding,
and the sampler can skip the batches a resumed run has already trained on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from laffi_exp.core.prompts import Prompter
from laffi_exp.core.records import Feedback, QAExample
from laffi_exp.models.padding import pad

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Pair:
    """One training text: the loss is on ``target`` alone."""

    id: str
    prompt: str
    target: str


def laffi_pairs(examples: Sequence[QAExample], feedback: Sequence[Feedback], prompter: Prompter) -> list[Pair]:
    """Feedback prediction: given question, context and the model's own answer, produce the feedback."""
    by_id = {f.id: f for f in feedback}
    return [
        Pair(
            ex.id,
            prompter.feedback_prompt(ex, by_id[ex.id].prediction),
            prompter.feedback_target(by_id[ex.id].feedback),
        )
        for ex in examples
    ]


def sft_pairs(examples: Sequence[QAExample], feedback: Sequence[Feedback], prompter: Prompter) -> list[Pair]:
    """Supervised fine-tuning on gold answers, with the same answer prompt as evaluation."""
    return [Pair(ex.id, prompter.answer_prompt(ex), prompter.answer_target(ex.gold)) for ex in examples]


def encode_pair(tokenizer, pair: Pair) -> tuple[list[int], list[int]]:
    """Token ids of prompt + target + EOS, and labels that are IGNORE_INDEX over the prompt."""
    prompt = tokenizer(pair.prompt, add_special_tokens=True)["input_ids"]
    target = tokenizer(pair.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


class PairDataset(Dataset):
    def __init__(self, tokenizer, pairs: Sequence[Pair], max_length: int, split: str):
        self.items = []
        dropped = 0
        for pair in pairs:
            ids, labels = encode_pair(tokenizer, pair)
            if len(ids) > max_length:
                dropped += 1
                continue
            self.items.append((ids, labels))
        self.dropped = dropped
        if dropped:
            log.warning("%s: dropped %d of %d examples longer than %d tokens", split, dropped, len(pairs), max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch; padding is masked out of attention and of the loss."""
    input_ids, attention_mask = pad([ids for ids, _ in batch], pad_id)
    labels, _ = pad([lab for _, lab in batch], IGNORE_INDEX, width=input_ids.shape[1])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LengthGroupedSampler(Sampler[int]):
    """A seeded shuffle in which consecutive ``batch_size`` indices have similar lengths: each epoch the
    examples are shuffled, cut into groups of ``group`` batches, each group sorted by length (longest
    first) and cut into batches, and the batches shuffled again. Every example is seen once an epoch;
    the order depends only on (seed, epoch) and the lengths."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 32):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.epoch = 0
        self.skip = 0  # indices of the next epoch already trained on (a resumed run): not yielded again

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        size = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        flat = [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]]
        skip, self.skip = self.skip, 0
        yield from flat[skip:]


class PairDataModule(pl.LightningDataModule):
    """Train and validation pairs, tokenized once; the shuffle order comes from ``seed``. With
    ``group_by_length`` the training batches hold examples of similar length (little padding); the
    validation batches are always cut from the pairs sorted by length (their order changes no loss)."""

    def __init__(
        self,
        tokenizer,
        train: Sequence[Pair],
        val: Sequence[Pair],
        batch_size: int,
        max_length: int,
        seed: int,
        group_by_length: bool = True,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.train_set = PairDataset(tokenizer, train, max_length, "train")
        self.val_set = PairDataset(tokenizer, val, max_length, "validation")
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        if len(self.train_set) == 0:
            raise ValueError(f"no training example fits in {max_length} tokens (model.max_length)")

    def _collate(self, batch):
        return collate(batch, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        if self.group_by_length:
            lengths = [len(ids) for ids, _ in self.train_set.items]
            sampler = LengthGroupedSampler(lengths, self.batch_size, self.seed)
            sampler.skip = self.batch_size * self._batches_done_this_epoch()
            # its own generator: making the iterator draws no number from the global random state
            return DataLoader(
                self.train_set,
                batch_size=self.batch_size,
                sampler=sampler,
                collate_fn=self._collate,
                generator=torch.Generator().manual_seed(self.seed),
            )
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen, collate_fn=self._collate
        )

    def _batches_done_this_epoch(self) -> int:
        """Training batches of the current epoch done before a checkpoint this run resumes from (0 otherwise):
        checkpoints follow an optimizer step, so the global step counts every batch done."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.global_step == 0:
            return 0
        per_epoch = math.ceil(len(self.train_set) / self.batch_size)
        return trainer.global_step * trainer.accumulate_grad_batches % per_epoch

    def val_dataloader(self) -> DataLoader:
        by_length = sorted(range(len(self.val_set)), key=lambda i: len(self.val_set.items[i][0]))
        return DataLoader(
            torch.utils.data.Subset(self.val_set, by_length), batch_size=self.batch_size, collate_fn=self._collate
        )
