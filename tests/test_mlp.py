"""lora_dpo/mlp.py: the gated MLP's product keeps gate and up for backward and recomputes act(gate) — the same
values and gradients as the model's own forward, and one (tokens, intermediate) tensor less saved per layer."""

from __future__ import annotations

import pytest
import torch
from test_estimate import tiny_config

from lora_dpo import mlp


def _lora_model(model_type: str, lean: bool, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_config(model_type, hidden_size=64, intermediate_size=176,
                                                        num_hidden_layers=2))
    for p in base.parameters():
        p.requires_grad_(False)
    switched = mlp.lean_gated_mlps(base) if lean else 0
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    return model, switched


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma"])  # SiLU; SiLU with q/k norms; tanh-GELU
def test_lean_product_changes_no_value_or_gradient(model_type):
    ids = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(1))
    out = {}
    for lean in (False, True):
        model, switched = _lora_model(model_type, lean)
        assert switched == (2 if lean else 0)
        logits = model(input_ids=ids).logits
        (logits.float().square().mean()).backward()
        out[lean] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (plain, g_plain), (lean_, g_lean) = out[False], out[True]
    assert torch.equal(plain, lean_)  # the forward computes the very same ops
    assert g_plain.keys() == g_lean.keys() and g_plain
    for n, g in g_plain.items():
        assert torch.allclose(g_lean[n], g, rtol=1e-5, atol=1e-7), n


def test_one_intermediate_tensor_less_is_saved():
    from test_estimate import _saved_bytes

    ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    saved = [_saved_bytes(_lora_model("llama", lean)[0], ids, mask) for lean in (False, True)]
    layers, tokens, intermediate = 2, ids.numel(), 176
    assert saved[0] - saved[1] == layers * tokens * intermediate * 4  # act(gate), fp32


def test_an_mlp_whose_forward_differs_is_left_alone():
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = torch.nn.Linear(4, 4)
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    m = torch.nn.Sequential(Other())
    assert mlp.lean_gated_mlps(m) == 0 and "forward" not in vars(m[0])


def test_loaded_models_use_it(tiny_model_dir):
    from lora_dpo import model as M
    from lora_dpo.recipe import ModelConfig, QuantizationConfig

    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32,
                       torch.device("cpu"))
    assert all(m.forward.func is mlp._lean_forward for m in base.modules() if hasattr(m, "gate_proj"))


def test_a_forward_is_recognised_by_what_it_computes_not_how_it_is_written():
    """transformers versions write the same forward with or without annotations, comments or a docstring, and with
    another argument name: all are the standard one; a forward computing anything else is not."""
    from lora_dpo.mlp import _GATED_FORWARD, forward_reads

    class Annotated(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return down_proj

    class Plain(torch.nn.Module):
        def forward(self, hidden):
            """A docstring."""
            # a comment
            down_proj = self.down_proj(
                self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))
            return down_proj

    class Other(torch.nn.Module):
        def forward(self, x):
            down_proj = self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))  # gate and up swapped
            return down_proj

    class Two(torch.nn.Module):
        def forward(self, x, scale):
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return down_proj

    assert forward_reads(Annotated, _GATED_FORWARD) and forward_reads(Plain, _GATED_FORWARD)
    assert not forward_reads(Other, _GATED_FORWARD) and not forward_reads(Two, _GATED_FORWARD)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_gradient_is_autograds_own_kernel_without_a_nested_pass(dtype, monkeypatch):
    """SiLU (Llama, Mistral, Qwen): backward calls silu's gradient kernel itself — the kernel autograd's graph calls,
    so the gradients are the plain product's bit for bit — and runs no autograd pass of its own; another activation
    (tanh-GELU) still differentiates through one."""
    from transformers.activations import ACT2FN

    g = torch.Generator().manual_seed(3)
    gate, up, grad = (torch.randn(5, 24, generator=g).to(dtype) for _ in range(3))
    nested, real_grad = [], torch.autograd.grad
    for name, fast in (("silu", True), ("swish", True), ("gelu_pytorch_tanh", False)):
        act = ACT2FN[name]
        assert mlp._is_silu(act) is fast
        plain = [t.clone().requires_grad_(True) for t in (gate, up)]
        (act(plain[0]) * plain[1]).backward(grad)
        nested.clear()
        monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: nested.append(1) or real_grad(*a, **k))
        lean = [t.clone().requires_grad_(True) for t in (gate, up)]
        out = mlp._GatedProduct.apply(*lean, None if fast else act)
        out.backward(grad)
        monkeypatch.undo()
        assert torch.equal(out, act(gate) * up)
        assert bool(nested) is not fast
        for p, q in zip(plain, lean):
            if fast:
                assert torch.equal(q.grad, p.grad), name
            else:
                torch.testing.assert_close(q.grad, p.grad)
    assert not mlp._is_silu(torch.nn.SiLU(inplace=True))


def test_an_in_place_activation_keeps_the_models_own_mlp():
    """An in-place act would overwrite the gate the lean product keeps for backward: that MLP stays as it is."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    m = torch.nn.Sequential(LlamaMLP(tiny_config("llama", hidden_size=8, intermediate_size=16)),
                            LlamaMLP(tiny_config("llama", hidden_size=8, intermediate_size=16)))
    m[0].act_fn = torch.nn.SiLU(inplace=True)
    assert mlp.lean_gated_mlps(m) == 1 and "forward" not in vars(m[0]) and "forward" in vars(m[1])
