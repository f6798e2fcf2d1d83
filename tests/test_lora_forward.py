"""The fused LoRA forward (lora_dpo/lora_forward.py) against peft's own: the same log-probs and gradients within
float rounding, the reference pass untouched, the same adapter, less kept for backward under autocast."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from lora_dpo import model as M
from lora_dpo.batching import build
from lora_dpo.data import Pair
from lora_dpo.logps import batch_logps
from lora_dpo.lora_forward import fuse_lora_forward
from lora_dpo.recipe import LoraConfig, ModelConfig, QuantizationConfig

CPU = torch.device("cpu")
PAIRS = [Pair([1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11], 0), Pair([12, 13], [14, 15, 16], [17, 18, 19], 1)]


def _models(path, quantized: bool, checkpointing: bool = False, dropout: float = 0.0, dtype=torch.float32):
    """peft's forward and the fused one on deep copies of the same model, lora_B nonzero (a fresh adapter's zero B
    would hide a wrong scaling)."""
    base = M.load_base(ModelConfig(name_or_path=str(path)), QuantizationConfig(load_in_4bit=quantized), dtype, CPU)
    peft_model = M.attach_lora(base, LoraConfig(lora_dropout=dropout), seed=0, gradient_checkpointing=checkpointing,
                               fuse_forward=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_forward(fused) == 2 * 7  # q k v o gate up down in each of the 2 layers
    for m in (peft_model, fused):
        m.train()
    return peft_model, fused


def _step(model, autocast: bool = False, seed: int = 0):
    """Log-probs and LoRA gradients of one training pass, and the bytes autograd kept for backward (each storage
    once, parameters not counted)."""
    model.zero_grad()
    kept = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logps = batch_logps(model, build(PAIRS, 0, "packed"))[0]
    logps.float().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach().float(), grads, sum(kept.values())


@pytest.mark.parametrize("quantized,checkpointing,dropout", [(True, False, 0.0), (True, True, 0.0),
                                                            (True, True, 0.1), (False, False, 0.1)])
def test_fused_forward_gives_peft_numbers(tiny_model_dir, quantized, checkpointing, dropout):
    peft_model, fused = _models(tiny_model_dir, quantized, checkpointing, dropout)
    want, want_grads, _ = _step(peft_model)
    got, got_grads, _ = _step(fused)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(got_grads) == set(want_grads)
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-6)
        assert g.abs().sum() > 0  # every adapter matrix gets a gradient: the comparison is not of zeros


def test_fused_forward_leaves_the_reference_pass_and_the_adapter_alone(tiny_model_dir):
    peft_model, fused = _models(tiny_model_dir, True)
    assert list(fused.state_dict()) == list(peft_model.state_dict())
    assert "lora.Linear4bit" in repr(fused)  # the same names in a printed model
    with torch.no_grad():
        with peft_model.disable_adapter():
            want = batch_logps(peft_model, build(PAIRS, 0, "packed"))[0]
        with fused.disable_adapter():
            got = batch_logps(fused, build(PAIRS, 0, "packed"))[0]
        adapted = batch_logps(fused, build(PAIRS, 0, "packed"))[0]
    assert torch.equal(got, want)  # adapters off: peft's own path, bit for bit
    with M.reference_mode(fused):  # training's reference pass: the adapter layers' own off switches
        assert torch.equal(batch_logps(fused, build(PAIRS, 0, "packed"))[0], want)
    assert not torch.allclose(adapted, got)  # and on: the adapter counts
    assert fuse_lora_forward(fused) == 0  # fusing twice changes nothing


def test_merging_a_fused_model_gives_peft_merged_weights(tiny_model_dir):
    peft_model, fused = _models(tiny_model_dir, False)
    want = peft_model.merge_and_unload().state_dict()
    got = fused.merge_and_unload().state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_under_autocast_the_fused_forward_keeps_no_fp32_copies_of_inputs(tiny_model_dir):
    """A 16-bit base under bf16 autocast: peft casts each adapted layer's input to the adapter's fp32 and autocast
    casts it back to bf16 for the matmul, which keeps that new bf16 copy for backward; the fused forward keeps the
    input the base layer keeps anyway. The log-probs agree to bf16 rounding."""
    peft_model, fused = _models(tiny_model_dir, False, dtype=torch.bfloat16)
    want, want_grads, want_kept = _step(peft_model, autocast=True)
    got, got_grads, got_kept = _step(fused, autocast=True)
    assert build(PAIRS, 0, "packed").input_ids.shape == (2, 11)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0.1)  # sums over tokens of bf16-rounded log-probs
    for n, g in want_grads.items():
        assert torch.nn.functional.cosine_similarity(got_grads[n].flatten(), g.flatten(), dim=0) > 0.99, n
    tokens, hidden, layers = 2 * 11, 64, 2  # the packed batch is 2 rows of 11; the tiny model 64 wide, 2 layers
    assert want_kept - got_kept >= layers * 3 * tokens * hidden * 2  # ≥ 3 bf16 copies of a layer's width per layer


@pytest.mark.parametrize("option", ["use_dora", "lora_bias"])
def test_variants_and_biases_run_peft_forward(tiny_model_dir, option):
    """Layers the fused forward was not written for (DoRA, a bias on lora_B) compute exactly what peft does."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(load_in_4bit=False),
                       torch.float32, CPU)
    torch.manual_seed(0)
    model = get_peft_model(base, PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                **{option: True}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
        want = batch_logps(model, build(PAIRS, 0, "packed"))[0]
        fuse_lora_forward(model)
        got = batch_logps(model, build(PAIRS, 0, "packed"))[0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("quantized", [True, False])
def test_a_bf16_base_under_an_fp32_adapter_without_autocast(tiny_model_dir, quantized):
    """CPU `train.precision: bf16`: the base computes in bf16, the adapter in fp32, no autocast. peft's 4-bit and
    16-bit layers round the sum differently there, so the fused forward hands it to peft's: bit for bit."""
    peft_model, fused = _models(tiny_model_dir, quantized, dtype=torch.bfloat16)
    want, want_grads, _ = _step(peft_model)
    got, got_grads, _ = _step(fused)
    assert torch.equal(got, want)
    for n, g in want_grads.items():
        assert torch.equal(got_grads[n], g), n


def _count(calls: dict, key: str, *_) -> None:
    calls[key] = calls.get(key, 0) + 1


class _Calls(dict):
    handles: list


def _base_calls(model) -> _Calls:
    """How often each adapted layer's base layer runs (forward hooks), by the layer's name; `.handles` removes the
    hooks."""
    calls = _Calls()
    calls.handles = []
    for name, module in model.named_modules():
        if name.endswith(".base_layer"):
            calls.handles.append(module.register_forward_hook(functools.partial(_count, calls, name.split(".")[-2])))
    return calls


@pytest.mark.parametrize("quantized,dropout", [(True, 0.0), (True, 0.1), (False, 0.0)])
def test_the_recompute_stops_before_the_mlp_output_base_gemm(tiny_model_dir, quantized, dropout):
    """With gradient checkpointing, each layer's recompute in backward ends once everything it kept is back: with
    down_proj's LoRA update computed before its base GEMM, that GEMM runs in the forward only. The other projections
    run twice (forward, recompute) — and log-probs and gradients are peft's."""
    peft_model, fused = _models(tiny_model_dir, quantized, checkpointing=True, dropout=dropout)
    ours = copy.deepcopy(fused)
    assert M.lora_forward.base_gemm_last(M.decoder_layers(ours)) == 2  # one down_proj per layer
    twice = {k: 4 for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    calls = _base_calls(fused)
    _step(fused)
    assert calls == twice  # 2 layers, each base GEMM in the forward and in the recompute
    calls = _base_calls(ours)
    got, got_grads, _ = _step(ours)
    assert calls == twice | {"down_proj": 2}
    want, want_grads, _ = _step(peft_model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-6)
        assert g.abs().sum() > 0


def test_attach_lora_puts_the_base_gemm_last_in_checkpointed_layers_only(tiny_model_dir):
    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(load_in_4bit=True),
                       torch.float32, CPU)
    model = M.attach_lora(base, LoraConfig(), seed=0, gradient_checkpointing=True, checkpoint_share=0.5)
    last = [n for n, m in model.named_modules() if m.__dict__.get("_lora_dpo_base_gemm_last")]
    assert [n.split("layers.")[1] for n in last] == ["0.mlp.down_proj"]  # the first of 2 layers recomputes
    assert M.lora_forward.unfuse_lora_forward(model) == 14
    assert not any(m.__dict__.get("_lora_dpo_base_gemm_last") for m in model.modules())
