"""LoRA dropout that keeps a 1-byte mask for backward instead of a dropped copy of the layer's input.

peft computes `lora_B(lora_A(dropout(x)))`: the dropout makes a new tensor `x · mask / (1 − p)` and `lora_A` keeps
it for its weight gradient, so every adapted Linear keeps its own full copy of its input (2–4 bytes per value) on top
of the mask — +76 % of a Llama-3-8B layer's saved activations with all-linear targets. `x` itself is kept anyway
(the frozen base layer keeps it for its input gradient), so `fuse_lora_dropout` makes `lora_A` apply the dropout
itself and keep only `x` (shared) and a boolean mask, rebuilding the dropped input in backward: +25 % instead.

The mask is drawn as peft's `nn.Dropout` draws it (`F.dropout` on a tensor of x's shape, dtype and device,
consuming the same random numbers), so on a CPU training gives peft's own numbers, bit for bit in the forward,
gradient checkpointing's recompute included (tests/test_lora_dropout.py); on a GPU the same mask distribution (CUDA's
fused dropout may assign its random numbers to elements differently for tensors aligned differently).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _DroppedLinear(torch.autograd.Function):
    """dropout(x) @ weightᵀ, keeping (x, keep mask) for backward rather than the dropped input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        keep = F.dropout(torch.ones_like(x), p, training=True) != 0  # drawn as nn.Dropout(x) draws its mask
        ctx.scale = 1.0 / (1.0 - p)
        ctx.dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        ctx.save_for_backward(x, weight, keep)
        return F.linear(x * keep * ctx.scale, weight)  # x · mask · scale as dropout computes it; autocast applies

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, keep = ctx.saved_tensors
        dtype = ctx.dtype or torch.promote_types(x.dtype, weight.dtype)  # the forward matmul's dtype
        g = grad.to(dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ((g @ weight.to(dtype)) * keep * ctx.scale).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = (x * keep * ctx.scale).to(dtype)  # bit for bit the forward's
            grad_w = (g.reshape(-1, g.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None


class DropoutLinear(torch.nn.Linear):
    """peft's `lora_A` with the adapter's dropout folded in: the same object and weight (same state-dict key), a
    new forward; dropout in training mode only, as nn.Dropout."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and self.weight.requires_grad:
            return _DroppedLinear.apply(x, self.weight, self.p)
        return F.linear(F.dropout(x, self.p, self.training), self.weight)


def fuse_lora_dropout(model) -> int:
    """Fold every LoRA layer's dropout into its lora_A (see the module docstring); → how many were folded. Layers
    with no dropout, a bias on lora_A or a LoRA variant (DoRA …) stay as peft made them."""
    n = 0
    for module in model.modules():
        drops, adapters = module._modules.get("lora_dropout"), module._modules.get("lora_A")
        if drops is None or adapters is None or getattr(module, "lora_variant", None):
            continue
        for name, drop in list(drops.items()):
            a = adapters[name] if name in adapters else None
            plain = type(a) is torch.nn.Linear and a.bias is None
            if not (isinstance(drop, torch.nn.Dropout) and drop.p > 0 and plain):
                continue
            a.__class__ = DropoutLinear  # the same object: its weight Parameter, hooks and key are unchanged
            a.p = drop.p
            drops[name] = torch.nn.Identity()
            n += 1
    return n
