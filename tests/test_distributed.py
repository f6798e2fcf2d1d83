"""Data parallel: 2 CPU processes (gloo, launched by torchrun) equal 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_dpo import train
from lora_dpo.recipe import recipe_from_dict


def test_two_processes_match_one(recipe_dict, tmp_path):
    recipe_dict["data"].pop("eval")
    # Adam's first steps are ≈ lr·sign(g); a large ε makes them ≈ lr·g so weights compare the averaged gradients
    recipe_dict["train"] = {"max_steps": 3, "learning_rate": 1.0, "adam_epsilon": 1.0, "max_grad_norm": 0.0,
                            "per_device_train_batch_size": 2}
    recipe_dict["output"]["dir"] = str(tmp_path / "dp2")
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "lora_dpo", str(path)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2 processes on cpu" in res.stdout
    assert res.stdout.count("step-0 check") == 1  # only rank 0 speaks

    recipe_dict["train"]["per_device_train_batch_size"] = 4  # the same global batch in one process
    recipe_dict["output"]["dir"] = str(tmp_path / "dp1")
    single = train(recipe_from_dict(recipe_dict))

    two = [json.loads(line) for line in (tmp_path / "dp2" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(single.history, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["rewards/accuracies"] == b["rewards/accuracies"]
    wa = load_file(single.adapter_dir / "adapter_model.safetensors")
    wb = load_file(tmp_path / "dp2" / "adapter" / "adapter_model.safetensors")
    assert any(wa[k].abs().max() > 0.01 for k in wa if "lora_B" in k)  # it trained
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_shards_split_a_length_sorted_batch_evenly():
    from lora_dpo.distributed import Context

    batch = list(range(8))  # a batch grouped by length: sorted, shortest first
    shards = [Context(rank=r, world=4).shard(batch) for r in range(4)]
    assert sorted(i for s in shards for i in s) == batch and all(len(s) == 2 for s in shards)
    cost = [sum(s) for s in shards]  # item i costs i: no rank gets the two longest
    assert max(cost) == min(cost), shards  # 0+7, 1+6, 2+5, 3+4
    assert Context().shard(batch) == batch
