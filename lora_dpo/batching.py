"""Pairs → a padded batch in the concatenated layout: rows [chosen_0 … chosen_{B-1}, rejected_0 … rejected_{B-1}].

Each row is prompt + completion, right-padded. `completion_mask` marks the completion tokens, the only ones
whose log-probs count.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lora_dpo.data import Pair


@dataclass
class Batch:
    input_ids: torch.Tensor        # (2B, T) long
    attention_mask: torch.Tensor   # (2B, T) long, 1 on real tokens
    completion_mask: torch.Tensor  # (2B, T) bool, True on completion tokens
    indices: list[int]             # source row of each pair, length B

    @property
    def num_pairs(self) -> int:
        return len(self.indices)

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device),
                     self.indices)


def collate(pairs: list[Pair], pad_token_id: int) -> Batch:
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    comp = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        comp[i, n: len(s)] = True
    return Batch(ids, attn, comp, [p.index for p in pairs])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of pair indices for one epoch; a function of (seed, epoch) only, so resume is exact."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def micro_batches(pairs: list[Pair], batch_size: int, seed: int, start: int = 0) -> Iterator[list[Pair]]:
    """Endless stream of micro-batches over shuffled epochs, skipping the first `start` micro-batches (resume).

    The last partial batch of an epoch is dropped from that epoch only (the next epoch reshuffles), so every
    optimizer step sees the same number of pairs.
    """
    per_epoch = max(1, len(pairs) // batch_size)
    k = start
    while True:
        epoch, pos = divmod(k, per_epoch)
        order = epoch_order(len(pairs), seed, epoch)
        chunk = order[pos * batch_size: (pos + 1) * batch_size]
        yield [pairs[i] for i in chunk]
        k += 1


def eval_batches(pairs: list[Pair], batch_size: int) -> Iterator[list[Pair]]:
    for i in range(0, len(pairs), batch_size):
        yield pairs[i: i + batch_size]
