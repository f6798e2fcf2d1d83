"""train.compile: each decoder layer's attention and MLP through torch.compile.

A training step calls each of those blocks three times (reference, policy and, with checkpointing, the recompute)
and backward once more, and each call is dozens of small operators — projections, their LoRA updates, the rotary
embedding, norms and casts — dispatched one by one from Python. When a GPU finishes those kernels faster than the
host can launch them (small micro-batches on a fast card), the step waits on Python; a compiled block is one call
into generated code that launches fused kernels. The blocks are compiled one by one (not the whole model) so that
gradient checkpointing, activation offloading and the chunked log-probs stay as they are around them, and every
layer reuses the same compiled code (parameters are the compiled code's inputs, not its constants).

Under compile the MLP (and any norm inside attention, as Qwen3's) is the model's own: which of its tensors to keep
for backward is the compiler's choice, which lora-dpo's lean MLP and norm (lora_dpo/mlp.py, rmsnorm.py) would only
hide from it. Generation (evaluation's samples and side-by-side answers) runs eagerly: decoding one token at a time
with a KV cache would compile a graph per length. The first steps compile (a minute or more); the log-probs equal
the eager ones to float rounding (tests/test_compile.py).
"""

from __future__ import annotations

import contextlib
import functools
import shutil

import torch

from lora_dpo import attention
from lora_dpo.errors import LoraDpoError

BLOCKS = ("self_attn", "mlp")
CXX = ("g++", "c++", "clang++")  # what inductor's CPU code needs to build
RECOMPILE_LIMIT = 32


def compile_layers(layers, device: torch.device, backend: str = "inductor") -> int:
    """Compile the attention and MLP blocks of each decoder layer in `layers`; → how many blocks."""
    if backend == "inductor" and device.type == "cpu" and not any(shutil.which(c) for c in CXX):
        raise LoraDpoError(f"train.compile: compiling for a CPU needs a C++ compiler and none of {', '.join(CXX)} "
                           "is on PATH; install one (e.g. apt-get install g++) or set train.compile: false")
    # a block's graphs: reference (adapters off), evaluation and policy passes, layer 0's input without grad, each
    # with fixed then dynamic lengths, more where layers differ (sliding windows): past torch's default of 8 per
    # block, the rest would silently run eagerly
    attention.raise_recompile_limit(RECOMPILE_LIMIT)
    n = 0
    for layer in layers:
        for name in BLOCKS:
            block = layer._modules.get(name)
            if block is None:  # another family's naming: that block stays eager
                continue
            for module in block.modules():  # lora-dpo's lean MLP (and norms inside attention, e.g. Qwen3's q/k
                if _lean(module.__dict__.get("forward")):  # norms): the model's own forward under compile, whose
                    del module.forward  # per-module partials would also make each layer compile its own graphs
            block.compile(backend=backend, dynamic=None)
            n += 1
    if layers and not n:
        raise LoraDpoError(f"train.compile: this model's decoder layers have none of the blocks it compiles "
                           f"({', '.join(BLOCKS)}); set train.compile: false")
    return n


def _lean(forward) -> bool:
    from lora_dpo import mlp, rmsnorm

    return isinstance(forward, functools.partial) and forward.func in (mlp._lean_forward, rmsnorm._lean_forward)


def eager():
    """A context in which compiled blocks run their eager code (generation)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()
