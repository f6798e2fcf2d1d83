"""The lean RMSNorm (lora_dpo/rmsnorm.py): transformers' forward bit for bit, the input gradient to float rounding,
half the bytes kept for backward in bf16, and the planner's family list in step with the norms it switches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_dpo.memory_model import FAMILIES, LEAN_NORMS
from lora_dpo.rmsnorm import lean_rmsnorms
from tests.test_estimate import tiny_config


def _norm_pair(dtype: torch.dtype, trained: bool = False):
    """transformers' Llama RMSNorm and a lean copy with the same (non-unit) weight."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    plain, lean = LlamaRMSNorm(96, eps=1e-5), LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        plain.weight.copy_(torch.rand(96, generator=torch.Generator().manual_seed(0)) + 0.5)
        lean.weight.copy_(plain.weight)
    for m in (plain, lean):
        m.to(dtype).weight.requires_grad_(trained)
    assert lean_rmsnorms(lean) == 1
    return plain, lean


def _run(norm, x0: torch.Tensor, grad: torch.Tensor):
    """Output, input gradient and the bytes autograd kept (parameters excluded, each storage once)."""
    x = x0.clone().requires_grad_(True)
    kept = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = norm(x)
    out.backward(grad)
    return out.detach(), x.grad, sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norm_gives_transformers_numbers_and_keeps_less(dtype):
    plain, lean = _norm_pair(dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 17, 96, generator=g) * 3).to(dtype)
    grad = torch.randn(3, 17, 96, generator=g).to(dtype)
    want, want_dx, want_kept = _run(plain, x, grad)
    got, got_dx, got_kept = _run(lean, x, grad)
    assert torch.equal(got, want)  # the same forward ops in the same order
    if dtype == torch.float32:
        torch.testing.assert_close(got_dx, want_dx, rtol=1e-5, atol=1e-6)
        assert got_kept == want_kept  # in fp32 the input is its own fp32 copy: the same bytes
    else:  # one bf16 rounding of the same fp32 value, the terms summed in another order
        torch.testing.assert_close(got_dx, want_dx, rtol=1.6e-2, atol=1e-3)
        tokens = 3 * 17
        assert want_kept - got_kept == tokens * 96 * 2  # 4·H + 4 → 2·H + 4 bytes per token


def test_a_trained_norm_weight_keeps_autograd_graph():
    """Where the norm's weight trains, its gradient needs the normalised values: transformers' own forward runs."""
    plain, lean = _norm_pair(torch.float32, trained=True)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(2))
    for m in (plain, lean):
        m(x).pow(2).sum().backward()
    assert plain.weight.grad is not None and torch.equal(lean.weight.grad, plain.weight.grad)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_planner_knows_which_families_norms_are_lean(model_type):
    """memory_model.LEAN_NORMS (the planner's b·H + 4 per norm) must be exactly the families whose norms
    lean_rmsnorms switches; the others (Gemma's 1 + weight) keep an fp32 copy, 4·H + 4."""
    config = tiny_config(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=1, head_dim=16)
    model = AutoModelForCausalLM.from_config(config)
    switched = lean_rmsnorms(model)
    assert (switched > 0) == (model_type in LEAN_NORMS), (model_type, switched)
