"""model.attn_implementation 'auto' and the kernel generation decodes on."""

from __future__ import annotations

import pytest
import torch
from conftest import trained_lora

from lora_dpo import generation
from lora_dpo import model as M
from lora_dpo.recipe import ModelConfig, QuantizationConfig

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("capability, layout, expected", [
    ((9, 0), "packed", "flex_attention"), ((8, 0), "shared", "flex_attention"),
    ((8, 0), "concatenated", "sdpa"),  # 2-D padding masks: nothing for a block mask to skip
    ((7, 5), "packed", "sdpa"),        # T4: no flex for older GPUs
    ((9, 0), None, "sdpa"),            # loading for evaluation or export
])
def test_auto_on_a_gpu(monkeypatch, capability, layout, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(M, "_flex_compiles", lambda: True)
    assert M.resolve_attention("auto", CUDA, layout) == expected


def test_auto_needs_triton_for_flex(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert M.resolve_attention("auto", CUDA, "packed") == "sdpa"  # e.g. Windows: torch without Triton


def test_auto_on_cpu_and_explicit_choices():
    cpu = torch.device("cpu")
    assert M.resolve_attention("auto", cpu, "packed") == "sdpa"
    for name in ("sdpa", "eager", "flex_attention"):
        assert M.resolve_attention(name, cpu, "packed") == name


def test_auto_loads_sdpa_on_cpu(tiny_model_dir):
    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32,
                       torch.device("cpu"), "packed")
    assert base.config._attn_implementation == "sdpa"


def test_generation_decodes_on_sdpa_and_switches_back(tiny_model_dir, tokenizer):
    flex, sdpa = trained_lora(tiny_model_dir, "flex_attention"), trained_lora(tiny_model_dir)
    lm = flex.get_base_model()
    seen = []
    generate = lm.generate

    def spy(*args, **kwargs):
        seen.append(lm.config._attn_implementation)
        return generate(*args, **kwargs)

    lm.generate = spy
    prompts = [tokenizer("Name a colour.")["input_ids"], tokenizer("Hi")["input_ids"]]
    got = generation.generate(flex, tokenizer, prompts, max_new_tokens=6)
    assert seen == ["sdpa"]
    assert lm.config._attn_implementation == "flex_attention"
    assert all(layer.self_attn.config._attn_implementation == "flex_attention"
               for layer in M.decoder_layers(flex))
    assert got == generation.generate(sdpa, tokenizer, prompts, max_new_tokens=6)  # same weights, same answers


def test_auto_falls_back_to_sdpa_where_the_architecture_has_no_flex(tiny_model_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(M, "resolve_attention", lambda name, device, layout=None: "flex_attention")
    monkeypatch.setattr(LlamaForCausalLM, "_supports_flex_attn", False)
    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32,
                       torch.device("cpu"), "packed")
    assert base.config._attn_implementation == "sdpa"
    from lora_dpo.errors import LoraDpoError

    with pytest.raises(LoraDpoError, match="model.attn_implementation: transformers has no flex_attention.*use auto"):
        M.load_base(ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation="flex_attention"),
                    QuantizationConfig(), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("gpu, layout, expected", [
    (None, "prefix-shared", "sdpa"),     # no GPU here: plan for sdpa's mask, the larger
    ((9, 0), "prefix-shared", "flex_attention"),  # the GPU that will train: plan for the kernel auto picks there
    ((7, 5), "prefix-shared", "sdpa"), ((9, 0), "concatenated", "sdpa"),
])
def test_estimate_plans_for_the_kernel_auto_picks(monkeypatch, gpu, layout, expected):
    from lora_dpo.estimate import Arch, estimate_for
    from lora_dpo.known_models import known_config
    from lora_dpo.recipe import recipe_from_dict

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu)
    monkeypatch.setattr(M, "_flex_compiles", lambda: True)
    d = {"model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct"}, "output": {"dir": "run"},
         "data": {"train": "t.jsonl", "max_length": 1024, "max_prompt_length": 512}}
    recipe = recipe_from_dict(d)
    arch = Arch.from_config(known_config("meta-llama/Llama-3.1-8B-Instruct"))
    est = estimate_for(recipe, 80 << 30, layout=layout, arch=arch)
    assert est.attention == expected
    d["model"]["attn_implementation"] = "sdpa"
    sdpa = estimate_for(recipe_from_dict(d), 80 << 30, layout=layout, arch=arch)
    assert (est.activations < sdpa.activations) == (expected == "flex_attention")  # no dense mask to hold


def test_flex_stays_compiled_across_the_states_a_run_uses(tiny_model_dir, monkeypatch):
    """flex_attention compiles a kernel per state it runs in (grad on/off × training autocast or not × several rows
    or one: ~12 in a GPU run with eval). Past torch's default limit of 8, torch would run it uncompiled from then on,
    materialising every score. CPU has no flex backward, so other global states stand in for grad on/off here:
    2 × 3 autocast states × 2 row-count kinds ≥ 9 kernels, which stay compiled. torch.compile's 'aot_eager' backend
    keeps this fast on a CPU (the kernel count and the fallback do not depend on the backend)."""
    import contextlib
    import random
    import warnings

    import torch._dynamo
    from transformers.integrations import flex_attention as hf_flex

    from lora_dpo.batching import build
    from lora_dpo.data import Pair
    from lora_dpo.logps import batch_logps

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: compile_(fn, backend="aot_eager"))
    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "_instance", None)  # a new one compiles, with the patch
    torch._dynamo.reset()
    m = trained_lora(tiny_model_dir, "flex_attention")
    assert torch._dynamo.config.recompile_limit >= 12
    r = random.Random(0)
    ids = lambda lo, hi: [r.randrange(5, 900) for _ in range(r.randint(lo, hi))]  # noqa: E731
    states = [lambda: torch.autocast("cpu", torch.bfloat16), lambda: torch.autocast("cpu", torch.float16),
              contextlib.nullcontext]
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for det in (False, True):
                torch.use_deterministic_algorithms(det)
                for state in states:
                    for rows in (4, 3, 1):
                        pairs = [Pair(ids(3, 30), ids(2, 20), ids(2, 20), i) for i in range(rows)]
                        with torch.no_grad(), state():
                            batch_logps(m, build(pairs, 2, "shared"))
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch._dynamo.reset()
    assert not [w for w in caught if "without torch.compile" in str(w.message)]
