"""train.compile (lora_dpo/compile.py): the attention and MLP of each decoder layer through torch.compile give the
eager log-probs and gradients, with and without gradient checkpointing, one set of graphs for all layers (not one per
layer), eager generation, and a clear error where a CPU has no C++ compiler."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import trained_lora

from lora_dpo import compile as C
from lora_dpo import model as M
from lora_dpo.batching import build
from lora_dpo.data import Pair
from lora_dpo.errors import LoraDpoError
from lora_dpo.generation import generate
from lora_dpo.logps import batch_logps
from lora_dpo.recipe import recipe_from_dict

CPU = torch.device("cpu")


def _model(path, checkpointing: bool):
    return trained_lora(path, gradient_checkpointing=checkpointing).train()


def _steps(m, batches):
    out = []
    for b in batches:
        m.zero_grad()
        with M.reference_mode(m):
            ref = batch_logps(m, b)[0]
        pol = batch_logps(m, b)[0]
        (pol - ref).sum().backward()
        out.append((ref, pol.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    return out


def _qwen3_dir(path):
    """A 3-layer Qwen3: RMSNorms inside its attention (q_norm, k_norm), which lora-dpo makes lean."""
    from transformers import AutoModelForCausalLM

    from tests.test_estimate import tiny_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("qwen3", num_hidden_layers=3)).save_pretrained(path)
    return path


@pytest.mark.parametrize("family,checkpointing", [("llama", False), ("llama", True), ("qwen3", True)])
def test_compiled_blocks_give_the_eager_numbers_with_one_set_of_graphs(tiny_model_dir, tokenizer, tmp_path, family,
                                                                      checkpointing):
    """aot_eager (the graphs torch.compile captures, run without code generation: fast enough for every run of the
    suite); the inductor backend is run end to end below. Batches of three lengths: the first new length makes the
    graphs dynamic, so the second compiles nothing more. A graph count that grew with the layers (a lean norm's or
    MLP's per-module forward would do that) would soon hit torch's recompile limit and run eagerly."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = _model(tiny_model_dir if family == "llama" else _qwen3_dir(tmp_path / "qwen3"), checkpointing)
    batches = [build([Pair(list(range(5, 12 + k)), [20, 21, 22], [30, 31 + k], i) for i in range(2)], 0, "packed")
               for k in range(3)]
    want = _steps(m, batches)
    layers = M.decoder_layers(m)
    assert C.compile_layers(layers, CPU, backend="aot_eager") == 2 * len(layers)  # attention and MLP
    assert torch._dynamo.config.recompile_limit >= C.RECOMPILE_LIMIT  # not torch's 8 per block
    got = _steps(m, batches)
    for (r1, p1, g1), (r2, p2, g2) in zip(want, got):
        torch.testing.assert_close(r2, r1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-5)
        for n, g in g1.items():
            torch.testing.assert_close(g2[n], g, rtol=1e-4, atol=1e-6)
            assert g.abs().sum() > 0
    graphs = counters["stats"]["unique_graphs"]
    # 10 whatever the layer count: per block, no-grad and grad graphs, static then dynamic lengths, and layer 0's
    # input without grad. Qwen3's lean q/k norms left inside the compiled attention made it 12 with 3 layers
    assert 0 < graphs <= 10
    _steps(m, batches)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing new for lengths seen
    if family == "llama":  # the demo tokenizer's ids fit the tiny Llama
        answers = generate(m, tokenizer, [[5, 6, 7]], max_new_tokens=3)
        assert len(answers) == 1 and counters["stats"]["unique_graphs"] == graphs  # generation ran eagerly


def test_a_compiled_training_run(recipe_dict):
    """The real path: inductor's generated CPU code, through `lora-dpo`'s training loop (step-0 check and held-out
    evaluation included)."""
    from lora_dpo import train

    recipe_dict["train"].update(max_steps=2, logging_steps=1)
    want = train(recipe_from_dict(recipe_dict))
    recipe_dict["train"]["compile"] = True
    recipe_dict["output"]["dir"] += "-compiled"
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    got = train(recipe_from_dict(recipe_dict))
    # the training passes' graphs only: held-out evaluation (an eval-mode model) runs eagerly — compiled, it made
    # 15 here, and minutes of compiling on a CPU after training
    assert 0 < counters["stats"]["unique_graphs"] <= 10
    assert abs(got.step0_loss - math.log(2)) < 1e-4
    losses = [[r["loss"] for r in run.history if "loss" in r] for run in (want, got)]
    assert len(losses[1]) == 2
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)  # the adapter stepped the same way


def test_no_cpp_compiler_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    m = _model(tiny_model_dir, False)
    with pytest.raises(LoraDpoError, match=r"train.compile: .*C\+\+ compiler.*train.compile: false"):
        C.compile_layers(M.decoder_layers(m), CPU)
    C.compile_layers(M.decoder_layers(m), torch.device("cuda"), backend="aot_eager")  # a GPU needs Triton, not C++


def test_a_model_without_the_blocks_is_a_clear_error():
    layers = [torch.nn.ModuleDict({"attn": torch.nn.Linear(2, 2), "ffn": torch.nn.Linear(2, 2)})]
    with pytest.raises(LoraDpoError, match=r"train.compile: .*self_attn, mlp.*train.compile: false"):
        C.compile_layers(layers, CPU, backend="aot_eager")
