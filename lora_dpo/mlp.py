"""The gated MLP's act(gate) · up, keeping two tensors for backward instead of three.

Every decoder lora-dpo plans for (the estimate's families) computes `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.
Autograd keeps, per token and layer, the gate (for act's backward), act(gate) and up (for the product's): three
(tokens, intermediate) tensors — the largest share of what a layer saves (intermediate ≈ 2.7–3.5 × hidden). The
gradients need only gate and up: act(gate) is recomputed from the gate in backward, an elementwise pass. Same
values, same gradients (tests/test_mlp.py); one tensor of intermediate width less per token and layer wherever
activations are kept: every layer without gradient checkpointing (CPU runs; the layers
train.gradient_checkpointing_layers leaves whole) and the layer being recomputed with it. With SiLU (Llama, Mistral,
Qwen) backward calls silu's gradient kernel itself, as autograd would, instead of running a small autograd pass of
its own in every layer: fewer calls for the host to make, the same bits.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
import torch.nn.functional as F

# the forward the patch stands in for (forward_body's form); a class whose forward reads otherwise is left alone
_SILU_FORWARD = "return nn.functional.silu(arg)"  # transformers' SiLUActivation
_GATED_FORWARD = "down_proj = self.down_proj(self.act_fn(self.gate_proj(arg)) * self.up_proj(arg))\nreturn down_proj"
_checked: dict[tuple[type, str], bool] = {}


class _GatedProduct(torch.autograd.Function):
    """act(gate) · up, saving gate and up; act(gate) is recomputed in backward. act None: SiLU, whose gradient
    kernel backward calls directly — the kernel autograd would call, without a nested autograd pass per layer."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return (F.silu(gate) if act is None else act(gate)) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if ctx.act is None:
            return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate), None
        with torch.enable_grad():
            g = gate.detach().requires_grad_(True)
            a = ctx.act(g)
            (d_gate,) = torch.autograd.grad(a, g, grad * up)
        return d_gate, grad * a.detach(), None


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    act = None if _is_silu(self.act_fn) else self.act_fn
    return self.down_proj(_GatedProduct.apply(self.gate_proj(x), self.up_proj(x), act))


def _is_silu(act) -> bool:
    """`act` computes silu(x) and nothing else: torch's SiLU (not in place) or a class whose forward reads
    `nn.functional.silu(x)` (transformers' SiLUActivation)."""
    if type(act) is torch.nn.SiLU:
        return not act.inplace
    return forward_reads(type(act), _SILU_FORWARD)


def forward_body(cls: type) -> str | None:
    """`cls.forward`'s statements as Python prints them back (`ast.unparse`: formatting, comments, the docstring and
    the signature's annotations left out), its one argument named `arg`; None where it has no readable source,
    takes more than one argument or is decorated."""
    try:
        fn = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):  # no source to read (a compiled or generated class)
        return None
    if not isinstance(fn, ast.FunctionDef) or len(fn.args.args) != 2 or fn.args.vararg or fn.args.kwarg \
            or fn.decorator_list:  # a decorator may change what the body computes
        return None
    body = [st for st in fn.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
    name = fn.args.args[1].arg
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.Name) and node.id == name:
            node.id = "arg"
    return "\n".join(ast.unparse(st) for st in body) if body else None


def forward_reads(cls: type, expected: str) -> bool:
    """`cls.forward` computes `expected` (statements as `forward_body` prints them): the code a lean replacement
    stands in for; a class whose forward reads otherwise, or has no source to read, is left alone."""
    if (cls, expected) not in _checked:
        _checked[cls, expected] = forward_body(cls) == expected
    return _checked[cls, expected]


def lean_gated_mlps(model) -> int:
    """Switch every standard gated MLP of `model` to the two-tensor product; → how many were switched."""
    n = 0
    for module in model.modules():
        gated = all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        in_place = gated and getattr(module.act_fn, "inplace", False)  # would overwrite the gate it keeps
        if gated and not in_place and forward_reads(type(module), _GATED_FORWARD):
            module.forward = functools.partial(_lean_forward, module)  # a bound method would not unpickle
            n += 1
    return n
