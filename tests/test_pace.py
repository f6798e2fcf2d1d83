"""Whether the GPU or the host sets a step's pace (lora_dpo/pace.py): the share of each step the host spends waiting
for the GPU at the step's read of its results, logged as host_wait_share on CUDA runs, and said once when the GPU
waited for the host."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from lora_dpo import pace as pace_mod
from lora_dpo import train
from lora_dpo.recipe import recipe_from_dict

train_mod = sys.modules["lora_dpo.train"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_step(p, clock, step, queue_s, wait_s):
    p.start(step)
    clock.now += queue_s  # the host queues the step's work
    with p.reading():
        clock.now += wait_s  # and waits for the GPU to finish it
    p.end()


def test_the_share_leaves_out_warm_up_steps_and_starts_anew_each_window(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(pace_mod.time, "perf_counter", clock)
    p = pace_mod.Pace(torch.device("cuda"))
    for step in (1, 2):  # warm-up: compiling, allocator growth
        run_step(p, clock, step, queue_s=5.0, wait_s=0.0)
    assert p.take() == {}
    run_step(p, clock, 3, queue_s=0.3, wait_s=0.7)
    run_step(p, clock, 4, queue_s=0.5, wait_s=0.5)
    assert p.take() == {"host_wait_share": pytest.approx(0.6)}
    assert p.span == (3, 4)
    run_step(p, clock, 5, queue_s=1.0, wait_s=0.0)
    assert p.take() == {"host_wait_share": 0.0} and p.span == (5, 5)


def test_a_resumed_run_leaves_out_its_own_first_steps(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(pace_mod.time, "perf_counter", clock)
    p = pace_mod.Pace(torch.device("cuda"))
    for step in (11, 12):  # the first steps of a resumed run compile kernels too
        run_step(p, clock, step, queue_s=5.0, wait_s=0.0)
    assert p.take() == {}
    run_step(p, clock, 13, queue_s=0.2, wait_s=0.8)
    assert p.take() == {"host_wait_share": pytest.approx(0.8)} and p.span == (13, 13)


def test_a_cpu_logs_no_share():
    p = pace_mod.Pace(torch.device("cpu"))
    for step in range(1, 5):
        p.start(step)
        with p.reading():
            pass
        p.end()
    assert p.take() == {}


def test_the_note_comes_once_and_only_when_the_gpu_waited():
    p = pace_mod.Pace(torch.device("cuda"))
    p.span = (3, 7)
    assert p.note({"loss": 0.7}) is None  # no share: a CPU, or warm-up steps
    assert p.note({"host_wait_share": 0.4}) is None  # the host waited: the GPU sets the pace
    note = p.note({"host_wait_share": 0.03})
    assert note.startswith("note: the GPU waited for the host in steps 3-7: the host spent 3% of each step waiting")
    assert "train.per_device_train_batch_size" in note and "train.compile: true" in note
    assert p.note({"host_wait_share": 0.01}) is None  # said once


def test_the_note_suggests_only_what_the_run_does_not_do_already():
    p = pace_mod.Pace(torch.device("cuda"), compiled=True)
    p.span = (3, 3)
    note = p.note({"host_wait_share": 0.02})
    assert note.startswith("note: the GPU waited for the host in step 3:")
    assert "train.per_device_train_batch_size" in note and "compile" not in note
    assert "gradient_checkpointing_layers" not in note  # nothing recomputes, or auto chose how many
    p = pace_mod.Pace(torch.device("cuda"), all_recompute=True)
    p.span = (3, 3)
    note = p.note({"host_wait_share": 0.02})
    assert "train.gradient_checkpointing_layers: auto" in note and "train.compile: true" in note


def test_training_logs_the_share_from_the_third_step_and_says_when_the_gpu_waited(recipe_dict, monkeypatch,
                                                                                   capsys):
    """A CPU has nothing to wait for, so the measure is forced on: every read is then instant (share ~0) and the
    note comes once; steps 1-2 are warm-up."""
    recipe_dict["data"].pop("eval")
    recipe_dict["train"]["max_steps"] = 4
    monkeypatch.setattr(train_mod, "Pace", lambda device, **kw: pace_mod.Pace(device, enabled=True, **kw))
    rows = train(recipe_from_dict(recipe_dict)).history
    assert ["host_wait_share" in r for r in rows] == [False, False, True, True]
    assert all(0 <= r["host_wait_share"] < pace_mod.WAITING for r in rows[2:])
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("note: the GPU waited for the host in step 3:") == 1


@pytest.mark.parametrize("checkpointing, layers, suggested", [(True, 1.0, True), (True, 0.5, False),
                                                              (True, "auto", False), (False, 1.0, False)])
def test_training_tells_the_pace_whether_every_layer_recomputes_by_the_recipes_choice(
        recipe_dict, monkeypatch, checkpointing, layers, suggested):
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=1, gradient_checkpointing=checkpointing,
                                gradient_checkpointing_layers=layers)
    made = []
    monkeypatch.setattr(train_mod, "Pace", lambda device, **kw: made.append(kw) or pace_mod.Pace(device, **kw))
    train(recipe_from_dict(recipe_dict))
    assert made == [{"compiled": False, "all_recompute": suggested}]


def test_the_wait_is_the_steps_read_of_its_results(recipe_dict, monkeypatch, capsys):
    """The share measures the reads: reads made slow (as a busy GPU makes them) raise it above the note's line."""
    recipe_dict["data"].pop("eval")
    recipe_dict["train"]["max_steps"] = 3
    monkeypatch.setattr(train_mod, "Pace", lambda device, **kw: pace_mod.Pace(device, enabled=True, **kw))
    add = train_mod.MetricMeter.add
    monkeypatch.setattr(train_mod.MetricMeter, "add", lambda self, *a: (time.sleep(0.5), add(self, *a))[1])
    rows = train(recipe_from_dict(recipe_dict)).history
    assert rows[2]["host_wait_share"] > pace_mod.WAITING
    captured = capsys.readouterr()
    assert "note: the GPU waited for the host" not in captured.out + captured.err


def test_a_cpu_run_logs_no_share(recipe_dict):
    recipe_dict["data"].pop("eval")
    recipe_dict["train"]["max_steps"] = 3
    assert not any("host_wait_share" in r for r in train(recipe_from_dict(recipe_dict)).history)
