"""Python's garbage collector during training (lora_dpo/heap.py): the objects alive when the loop starts are out of
the full collections' walks while it runs, garbage from before is freed first, and nothing stays frozen after."""

from __future__ import annotations

import gc
import sys
import weakref

from lora_dpo import heap, train
from lora_dpo.recipe import recipe_from_dict

train_mod = sys.modules["lora_dpo.train"]


class Node:
    pass


def test_frozen_collects_first_freezes_and_gives_everything_back():
    assert gc.get_freeze_count() == 0
    cycle = Node()
    cycle.me = cycle  # garbage only the cyclic collector frees
    dead = weakref.ref(cycle)
    alive = Node()
    del cycle
    with heap.frozen():
        assert dead() is None  # collected before the freeze, not frozen with the rest
        frozen_now = gc.get_freeze_count()
        assert frozen_now > 1000  # the libraries' objects (and `alive`) are out of the collector's walks
        assert alive is not None
        with heap.frozen():  # nested: the inner block neither freezes again nor unfreezes
            assert gc.get_freeze_count() == frozen_now
        assert gc.get_freeze_count() == frozen_now
        late = Node()
        late.me = late
        late_ref = weakref.ref(late)
        del late
        gc.collect()
        assert late_ref() is None  # what the block creates is still collected
    assert gc.get_freeze_count() == 0


def test_frozen_unfreezes_when_the_block_raises():
    try:
        with heap.frozen():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.get_freeze_count() == 0


def test_training_steps_run_with_the_setup_frozen(recipe_dict, monkeypatch):
    recipe_dict["data"].pop("eval")
    recipe_dict["train"]["max_steps"] = 2
    counts = []
    forward = train_mod.dpo_forward
    monkeypatch.setattr(train_mod, "dpo_forward", lambda *a, **k: counts.append(gc.get_freeze_count()) or
                        forward(*a, **k))
    train(recipe_from_dict(recipe_dict))
    # both training steps ran with the setup frozen; nothing is frozen afterwards
    assert len(counts) == 2 and min(counts) > 1000
    assert gc.get_freeze_count() == 0


def test_the_reference_precompute_pass_runs_frozen(tiny_model_dir, monkeypatch):
    import contextlib

    import torch
    from conftest import trained_lora

    from lora_dpo import refcache
    from lora_dpo.data import Pair

    counts = []
    real = refcache.batch_logps
    monkeypatch.setattr(refcache, "batch_logps", lambda *a, **k: counts.append(gc.get_freeze_count()) or real(*a, **k))
    pairs = [Pair([5 + i, 6, 7], [8, 9 + i], [10], i) for i in range(3)]
    refcache.compute(trained_lora(tiny_model_dir), pairs, 0, 2, "packed", torch.device("cpu"), contextlib.nullcontext())
    assert len(counts) == 2 and min(counts) > 1000 and gc.get_freeze_count() == 0
