"""The LoRA update added to the base layer's output in one GEMM.

peft's LoRA layers compute `result = base(x)`, then (4-bit base) a defensive `result.clone()`, then
`lora_B(lora_A(x))`, `· scaling` and `result + …`: three passes over a (tokens, out_features) tensor per adapted
Linear, each a kernel of its own, in every policy forward, recompute and backward. Its 16-bit layers also cast `x` to
the adapter's dtype (fp32) even under autocast, where the matmul casts it straight back: a full fp32 copy of every
adapted layer's input. `fuse_lora_forward` gives each LoRA layer a forward that computes

    result = addmm(base(x), lora_A(x), lora_Bᵀ, alpha=scaling)

— the scaling and the sum in the GEMM's epilogue, accumulated in fp32 and rounded once (peft rounds the product, the
scaled product and the sum: the fused form is the more exact one), no clone (nothing is modified in place), no fp32
copy under autocast, and nothing kept for backward that peft's forward does not keep. The same parameters,
state-dict keys, merge and save; the reference pass (adapters disabled), merged layers, LoRA variants (DoRA …), a
bias on lora_B, mixed-adapter batches and, without autocast, an adapter in another dtype than its input run
peft's own forward. Equality with peft's forward, values and gradients, with and without gradient checkpointing and
folded dropout: tests/test_lora_forward.py.

In checkpointed layers the MLP's output projection runs the other way round — LoRA update first, base GEMM last
(`base_gemm_last`) — so that the recompute in backward, which stops once everything the layer keeps exists again,
stops before that base GEMM: a quarter of a Llama layer's linear work, once per step.
"""

from __future__ import annotations

import torch

_FUSED: dict[type, type] = {}  # peft class → its subclass with the fused forward
_BASE_LAST = "_lora_dpo_base_gemm_last"  # instance flag: this layer runs its base GEMM after its LoRA update


def _fusable(layer, x: torch.Tensor, autocast: bool, args: tuple, kwargs: dict) -> bool:
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in layer.lora_variant or layer.lora_B[name].bias is not None:
            return False
        if not autocast and layer.lora_A[name].weight.dtype != x.dtype:
            return False  # a bf16 base under an fp32 adapter without autocast: each peft class rounds its own way
    return True


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if not _fusable(self, x, autocast, args, kwargs):
        return type(self).__mro__[1].forward(self, x, *args, **kwargs)  # peft's own
    if self.__dict__.get(_BASE_LAST, False):
        return _base_last_forward(self, x, autocast)
    result = self.base_layer(x)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        b = self.lora_B[name]
        h = _lora_a(self, name, x, autocast)
        dtype = torch.get_autocast_dtype(device) if autocast else h.dtype
        if result.dtype != dtype:  # an fp32 base output under bf16 autocast: peft's sum (fp32 + the bf16 update)
            result = result + (b(h) * self.scaling[name]).to(result.dtype)
            continue
        out = result.shape[-1]  # lora_B's weight as it is (a view of the parameter is all addmm keeps for backward)
        result = torch.addmm(result.reshape(-1, out), h.reshape(-1, h.shape[-1]), b.weight.t(),
                             alpha=self.scaling[name]).view(result.shape)
    return result


def _lora_a(self, name: str, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    a = self.lora_A[name]
    return a(self.lora_dropout[name](x if autocast else x.to(a.weight.dtype)))


def _base_last_forward(self, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    """The LoRA updates first, the base GEMM last: everything this layer keeps for backward is kept before the base
    GEMM runs (see `base_gemm_last`). The update is rounded once to the compute dtype, then added (scaled, in fp32
    inside the add) to the base output: two roundings where the epilogue form has one and peft three."""
    updates = [(self.lora_B[name](_lora_a(self, name, x, autocast)), self.scaling[name])
               for name in self.active_adapters if name in self.lora_A]
    result = self.base_layer(x)
    for update, scaling in updates:
        result = torch.add(result, update.to(result.dtype), alpha=scaling)
    return result


def _fused_class(cls: type) -> type:
    """peft's `cls` with the fused forward (one subclass per peft class, made once)."""
    if cls not in _FUSED:
        _FUSED[cls] = type(cls.__name__, (cls,), {"forward": _forward, "__reduce_ex__": _reduce_ex,
                                                  "__module__": cls.__module__})
    return _FUSED[cls]


def _rebuild(peft_cls: type):
    return peft_cls.__new__(_fused_class(peft_cls))


def _reduce_ex(self, protocol):
    """Pickle (torch.save of a whole model, deepcopy) by peft's class, which pickle can find by name: the fused
    subclass shares peft's module and name (printed models read as peft's) and cannot be looked up itself."""
    return _rebuild, (type(self).__mro__[1],), self.__dict__


def fuse_lora_forward(model) -> int:
    """Give every LoRA Linear layer of `model` the fused forward (see the module docstring); → how many."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, LoraLayer) or cls in _FUSED.values() or not hasattr(module, "base_layer"):
            continue
        if not isinstance(module.get_base_layer(), torch.nn.Linear):  # embeddings, convolutions: peft's own
            continue
        module.__class__ = _fused_class(cls)  # the same object: parameters, hooks and keys unchanged
        n += 1
    return n


def base_gemm_last(layers, names: tuple[str, ...] = ("down_proj",), on: bool = True) -> int:
    """In each of `layers` (checkpointed decoder layers), let the fused LoRA layers called `names` — a gated MLP's
    output projection, the last thing a Llama-style layer computes before its residual add — run their base GEMM
    after their LoRA update; → how many.

    Gradient checkpointing recomputes a layer in backward only until every tensor it kept for backward exists again
    (torch's non-reentrant checkpoint stops early): the base GEMM of the layer's last projection keeps nothing (a 4-bit
    base keeps its weight outside autograd's saved tensors) and its output only feeds the layer's output, which the
    recompute does not need. With the LoRA update first, the recompute stops before that GEMM: a quarter of a
    Llama layer's linear FLOPs (4096 × 14336 of its 218 M weights at 8B) skipped once per step. Where something after
    it keeps a tensor (Gemma's norm after the MLP), the recompute goes on and runs the GEMM: the same numbers either
    way (tests/test_lora_forward.py). on=False puts those base GEMMs first again (benchmarks compare the two)."""
    n = 0
    for layer in layers:
        for name, module in layer.named_modules():
            if type(module) in _FUSED.values() and name.rsplit(".", 1)[-1] in names:
                module.__dict__[_BASE_LAST] = on
                n += 1
    return n


def unfuse_lora_forward(model) -> int:
    """Give the fused layers of `model` back peft's own forward (benchmarks compare the two); → how many."""
    n = 0
    for module in model.modules():
        if type(module) in _FUSED.values():
            module.__class__ = type(module).__mro__[1]
            module.__dict__.pop(_BASE_LAST, None)
            n += 1
    return n
