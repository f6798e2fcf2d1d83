"""The gated MLP's act(gate) · up, keeping two tensors for backward instead of three.

Every decoder lora-dpo plans for (the estimate's families) computes `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.
Autograd keeps, per token and layer, the gate (for act's backward), act(gate) and up (for the product's): three
(tokens, intermediate) tensors — the largest share of what a layer saves (intermediate ≈ 2.7–3.5 × hidden). The
gradients need only gate and up: act(gate) is recomputed from the gate in backward, an elementwise pass. Same
values, same gradients (tests/test_mlp.py); one tensor of intermediate width less per token and layer wherever
activations are kept: every layer without gradient checkpointing (CPU runs; the layers
train.gradient_checkpointing_layers leaves whole) and the layer being recomputed with it.
"""

from __future__ import annotations

import inspect
import types

import torch

# the forward the patch stands in for, whitespace removed; a class whose forward reads otherwise is left alone
_GATED_FORWARD = ("defforward(self,x):down_proj=self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"
                  "returndown_proj")
_checked: dict[type, bool] = {}


class _GatedProduct(torch.autograd.Function):
    """act(gate) · up, saving gate and up; act(gate) is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            g = gate.detach().requires_grad_(True)
            a = ctx.act(g)
            (d_gate,) = torch.autograd.grad(a, g, grad * up)
        return d_gate, grad * a.detach(), None


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_GatedProduct.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


def _standard(cls: type) -> bool:
    if cls not in _checked:
        try:
            _checked[cls] = "".join(inspect.getsource(cls.forward).split()) == _GATED_FORWARD
        except (OSError, TypeError):  # no source to read (a compiled or generated class)
            _checked[cls] = False
    return _checked[cls]


def lean_gated_mlps(model) -> int:
    """Switch every standard gated MLP of `model` to the two-tensor product; → how many were switched."""
    n = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and _standard(type(module)):
            module.forward = types.MethodType(_lean_forward, module)
            n += 1
    return n
