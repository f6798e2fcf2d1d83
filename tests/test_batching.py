"""The order of pairs: shuffled or grouped by length, exact on resume, and equal under gradient accumulation."""

from __future__ import annotations

import random
from itertools import islice

import pytest

from lora_dpo.batching import GROUP_WINDOW, describe, epoch_batches, micro_batch_indices, row_tokens
from lora_dpo.data import Pair


def _lengths(n: int, seed: int = 0) -> list[int]:
    r = random.Random(seed)
    return [r.randint(60, 600) for _ in range(n)]


def _pairs(lengths: list[int]) -> list[Pair]:  # a prompt of a third, two completions of the rest
    return [Pair([1] * (n // 3), [2] * (n - n // 3 - n // 6), [3] * (n // 6), i) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("group", [False, True])
def test_an_epoch_holds_every_pair_once(group):
    lengths = _lengths(1000)
    batches = epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=group)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 1000 and all(len(b) == 8 for b in batches)
    assert batches == epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=group)  # a function of the seed
    assert batches != epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=group)  # epochs reshuffle


def test_grouping_cuts_padding_and_runs_the_longest_batch_first():
    lengths = _lengths(4096)
    pairs = _pairs(lengths)
    plain = epoch_batches(lengths, 8, seed=0, epoch=0)
    grouped = epoch_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    pad = lambda batches, layout: 1 - (lambda d, t: d / t)(*row_tokens(pairs, batches, layout))
    assert pad(plain, "shared") > 0.25 and pad(grouped, "shared") < 0.02
    assert pad(grouped, "packed") <= pad(grouped, "shared") and pad(plain, "packed") <= pad(plain, "shared")
    size = lambda b: sum(lengths[i] for i in b)
    assert size(grouped[0]) == max(size(b) for b in grouped)
    # the order of the batches stays random: within a window they are not sorted by length
    window = [size(b) for b in grouped[1:GROUP_WINDOW]]
    assert window != sorted(window) and window != sorted(window, reverse=True)


@pytest.mark.parametrize("group", [False, True])
def test_resume_continues_the_same_stream(group):
    lengths = _lengths(50)
    full = list(islice(micro_batch_indices(lengths, 4, 7, group_by_length=group, accumulation=2), 60))
    tail = list(islice(micro_batch_indices(lengths, 4, 7, start=22, group_by_length=group, accumulation=2), 38))
    assert tail == full[22:]


def test_accumulated_micro_batches_make_the_big_batch():
    lengths = _lengths(300)
    big = list(islice(micro_batch_indices(lengths, 8, 1, group_by_length=True), 80))
    small = list(islice(micro_batch_indices(lengths, 4, 1, group_by_length=True, accumulation=2), 160))
    assert [small[2 * k] + small[2 * k + 1] for k in range(80)] == big


def test_too_few_pairs_to_group_still_batches():
    lengths = [5, 9, 7]
    stream = micro_batch_indices(lengths, 2, 0, group_by_length=True, accumulation=4)
    assert all(len(b) == 2 for b in islice(stream, 10))


def test_describe_names_the_padding_and_the_concatenated_cost():
    pairs = _pairs(_lengths(256))
    line = describe(pairs, 4, 1, 0, "packed", True)
    assert "grouped by length" in line and "layout packed" in line and "padding" in line
    concat = float(line.split("would run ")[1].split("×")[0])
    assert concat > 1.3  # every prompt twice, plus padding
    assert "each prompt twice" in describe(pairs, 4, 1, 0, "concatenated", False)


@pytest.mark.parametrize("n, batch, accumulation, group", [(32, 4, 3, True), (32, 4, 3, False), (7, 4, 1, True),
                                                          (400, 4, 1, True), (50, 3, 2, False), (5, 4, 1, False)])
def test_an_epoch_uses_each_pair_at_most_once_and_says_what_it_leaves_out(n, batch, accumulation, group):
    """num_train_epochs counts the epochs the batching cuts: whole optimizer steps, so no step reaches into the next
    (reshuffled) epoch — which would show some pairs twice and leave others out, unsaid."""
    from collections import Counter

    from lora_dpo.batching import epoch_shape, micro_batch_indices
    from lora_dpo.optim import epochs_line, total_steps
    from lora_dpo.recipe import TrainConfig

    cfg = TrainConfig(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                      group_by_length=group)
    steps = total_steps(cfg, n)
    stream = micro_batch_indices([10 + i % 7 for i in range(n)], batch, 42, group_by_length=group,
                                 accumulation=accumulation)
    seen = Counter(i for _ in range(steps * accumulation) for i in next(stream))
    _, left_out = epoch_shape(n, batch, accumulation, group)
    assert max(seen.values()) == 1 and n - len(seen) == left_out
    line = epochs_line(cfg, n, steps)
    assert line.startswith(f"{steps} optimizer step") and " = 1 epoch of " in line
    assert (f"each epoch leaves out {left_out} of the {n} pairs" in line) == (left_out > 0)


def test_describe_says_when_the_data_is_smaller_than_a_batch():
    assert describe([Pair([1, 2], [3], [4], 0)], 4, 1, 42, "packed", True).startswith(
        "batches of 1 pair (all there are), grouped by length")
