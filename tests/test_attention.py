"""model.attn_implementation: 'auto', the kernel generation decodes on, and lora-dpo's own sdpa_causal."""

from __future__ import annotations

import pytest
import torch
from conftest import trained_lora

from lora_dpo import attention as A
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
    monkeypatch.setattr(A, "_flex_compiles", lambda: True)
    assert A.resolve_attention("auto", CUDA, layout) == expected


def test_auto_needs_triton_for_flex(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert A.resolve_attention("auto", CUDA, "packed") == "sdpa"  # e.g. Windows: torch without Triton


def test_auto_on_cpu_and_explicit_choices():
    cpu = torch.device("cpu")
    assert A.resolve_attention("auto", cpu, "packed") == "sdpa"
    for name in ("sdpa", "sdpa_causal", "eager", "flex_attention"):
        assert A.resolve_attention(name, cpu, "packed") == name


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

    monkeypatch.setattr(A, "resolve_attention", lambda name, device, layout=None: "flex_attention")
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
    monkeypatch.setattr(A, "_flex_compiles", lambda: True)
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


# ---------------------------------------------------------------- sdpa_causal


def test_split_plan_gathers_each_pairs_two_sequences():
    """The plan's sequences are exactly prompt + chosen and prompt + rejected, and merging them back gives every
    row token its own sequence's output: checked on token ids, packed rows and one pair per row, an empty prompt."""
    from lora_dpo.batching import PAD, build
    from lora_dpo.data import Pair
    from tests.test_layouts import PAIRS

    pairs = PAIRS + [Pair([], [40, 41], [42, 43, 44], 5)]
    for layout in ("packed", "shared"):
        b = build(pairs, 2, layout)
        plan = A.split_plan(b.slot, b.part, b.position_ids, b.num_pairs, b.seq_len)
        S, L = plan["shape"]
        assert (S, L) == (2 * len(pairs), max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                                             for p in pairs))
        seqs = b.input_ids.reshape(-1)[plan["gather"]].view(S, L)
        for k, p in enumerate(pairs):
            for s, completion in ((k, p.chosen_ids), (len(pairs) + k, p.rejected_ids)):
                n = len(p.prompt_ids) + len(completion)
                assert seqs[s, :n].tolist() == p.prompt_ids + completion
        merged = seqs.reshape(-1)[plan["merge"]].view(b.input_ids.shape)
        real = b.slot != PAD
        assert torch.equal(merged[real], b.input_ids[real])


def test_sdpa_causal_runs_plain_causal_sdpa_and_builds_no_mask(tiny_model_dir, monkeypatch):
    from lora_dpo.batching import SharedBatch, build
    from lora_dpo.logps import batch_logps
    from tests.test_layouts import PAIRS

    m = trained_lora(tiny_model_dir, "sdpa_causal")
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), attn_mask, kw.get("is_causal")))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(SharedBatch, "dense_mask", lambda self: pytest.fail("sdpa_causal built a dense mask"))
    batch = build(PAIRS, 2, "packed")
    with torch.no_grad():
        batch_logps(m, batch)
    layers = m.get_base_model().config.num_hidden_layers
    heads = m.get_base_model().config.num_attention_heads
    assert len(calls) == layers
    assert all(shape[:3] == (2 * len(PAIRS), heads, batch.seq_len) and mask is None and causal
               for shape, mask, causal in calls)


def test_sdpa_causal_native_gqa_equals_repeated_heads(tiny_model_dir, monkeypatch):
    """Where sdpa's flash kernel takes it (Ampere+ GPUs, 16 bit) sdpa gets enable_gqa; elsewhere keys and values are
    repeated per head. Both give the same log-probs (the tiny model has 4 heads over 2 key/value heads); on a CPU
    the flash check says no."""
    from lora_dpo.batching import build
    from lora_dpo.logps import batch_logps
    from tests.test_layouts import PAIRS

    m = trained_lora(tiny_model_dir, "sdpa_causal")
    with torch.no_grad():
        repeated, _ = batch_logps(m, build(PAIRS, 2, "packed"))
        monkeypatch.setattr(A, "_native_gqa", lambda query, key: True)
        native, _ = batch_logps(m, build(PAIRS, 2, "packed"))
    assert torch.allclose(native, repeated, atol=1e-5, rtol=0)
    monkeypatch.undo()
    q, k = torch.zeros(2, 4, 8, 16), torch.zeros(2, 2, 8, 16)
    assert not A._native_gqa(q, k)


def test_sdpa_causal_generates_as_sdpa(tiny_model_dir, tokenizer):
    """Without a gather plan (generation, 2-D masks) sdpa_causal is transformers' sdpa, masks included."""
    prompts = [tokenizer("Name a colour.")["input_ids"], tokenizer("Hi")["input_ids"]]  # left-padded together
    got = generation.generate(trained_lora(tiny_model_dir, "sdpa_causal"), tokenizer, prompts, max_new_tokens=6)
    assert got == generation.generate(trained_lora(tiny_model_dir), tokenizer, prompts, max_new_tokens=6)


@pytest.mark.parametrize("extra, needle", [({"sliding_window": 3}, "3-token sliding window to 4-token sequences"),
                                           ({"softcap": 30.0}, "softcapping or sink tokens.*use flex_attention")])
def test_sdpa_causal_refuses_what_plain_causal_sdpa_cannot_do(extra, needle):
    from lora_dpo.errors import LoraDpoError

    q = torch.zeros(1, 2, 4, 8)
    plan = {"gather": torch.arange(4), "merge": torch.arange(4), "shape": (1, 4)}
    assert A.sdpa_causal_forward(torch.nn.Module(), q, q, q, None, lora_dpo_split=plan)[0].shape == (1, 4, 2, 8)
    with pytest.raises(LoraDpoError, match=f"model.attn_implementation: sdpa_causal .*{needle}"):
        A.sdpa_causal_forward(torch.nn.Module(), q, q, q, None, lora_dpo_split=plan, **extra)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral", "gemma"])
def test_sdpa_causal_equals_the_plain_forward_on_other_families(tmp_path, model_type):
    """Biased q/k/v (qwen2), per-head q/k norms (qwen3), GELU and a query scale of its own (gemma), all on a 4-bit
    base with GQA: sdpa_causal's log-probs equal the plain concatenated forward's."""
    from test_estimate import tiny_config
    from transformers import AutoModelForCausalLM

    from lora_dpo.batching import build, collate
    from lora_dpo.logps import batch_logps, plain_batch_logps
    from lora_dpo.recipe import LoraConfig
    from tests.test_layouts import PAIRS

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type, num_key_value_heads=2)).save_pretrained(tmp_path)
    base = M.load_base(ModelConfig(name_or_path=str(tmp_path), attn_implementation="sdpa_causal"),
                       QuantizationConfig(), torch.float32, torch.device("cpu"))
    m = M.attach_lora(base, LoraConfig(r=4), seed=0, gradient_checkpointing=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        want, _ = plain_batch_logps(m, collate(PAIRS, 2))
        got, _ = batch_logps(m, build(PAIRS, 2, "packed"))
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
