"""RMSNorm keeping its input as it came in (bf16 on a GPU) for backward instead of an fp32 copy.

The RMSNorm of Llama, Mistral, Qwen2 and Qwen3 (transformers' standard one) upcasts its input to fp32, normalises and
casts back: autograd keeps the fp32 copy (4 bytes per value) and 1/rms for backward, 4·H + 4 bytes per token — two
norms per layer, 10.5 % of what a Llama-3-8B layer keeps in bf16. The gradient needs only the input and 1/rms: the fp32
values are the input's own, exactly (a widening cast), so `lean_rmsnorms` keeps the input in its own dtype (2 bytes per
value in bf16) and rebuilds them in backward: 2·H + 4. Same forward, bit for bit; the input gradient by the closed
form dx = r·(g − y·mean(g·y)), y = x·r, in fp32 where autograd chains the same terms, so equal to float rounding
(tests/test_rmsnorm.py). In fp32 (CPU) the input is its own fp32 copy: nothing changes there but the arithmetic's order.
Where the norm's weight trains (lora-dpo's never does) or a class's forward reads otherwise (Gemma's 1 + weight), the
norm is left as it is.
"""

from __future__ import annotations

import functools

import torch

from lora_dpo.mlp import forward_reads

# the forward the patch stands in for (mlp.forward_body's form); a class whose forward reads otherwise is left alone
_STANDARD_FORWARD = "\n".join([
    "input_dtype = arg.dtype",
    "arg = arg.to(torch.float32)",
    "variance = arg.pow(2).mean(-1, keepdim=True)",
    "arg = arg * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * arg.to(input_dtype)"])


class _Normalized(torch.autograd.Function):
    """x · rsqrt(mean(x²) + eps) in fp32, cast back to x's dtype; keeps x (its own dtype) and 1/rms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, r)
        return (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, r = ctx.saved_tensors
        y, g = x.to(torch.float32) * r, grad.to(torch.float32)  # y: the normalised values, |y| ~ 1 whatever |x| is
        dx = r * (g - y * (g * y).mean(-1, keepdim=True))  # = r·g − r³·x·⟨g, x⟩/H, without r³ under/overflowing
        return dx.to(x.dtype), None


def _lean_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad:  # a trained norm: autograd's own graph (the weight's gradient needs the output)
        return type(self).forward(self, hidden_states)
    return self.weight * _Normalized.apply(hidden_states, self.variance_epsilon)


def lean_rmsnorms(model) -> int:
    """Switch every standard RMSNorm of `model` to the lean one; → how many were switched."""
    n = 0
    for module in model.modules():
        norm = hasattr(module, "variance_epsilon") and hasattr(module, "weight")
        if norm and forward_reads(type(module), _STANDARD_FORWARD):
            module.forward = functools.partial(_lean_forward, module)  # a bound method would not unpickle
            n += 1
    return n
