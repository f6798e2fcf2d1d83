"""Checkpoints stored already quantized by bitsandbytes (hub repos named `…-bnb-4bit`, or a 4-bit model saved with
`save_pretrained`): a smaller download that loads without a quantization step.

Such a checkpoint's config carries its `quantization_config`, and transformers loads it as stored whatever the
caller asks for. So the recipe's quantization keys are checked against it before any weight loads: a 4-bit
checkpoint cannot train unquantized or in 8 bit (a clear error), and a quant type or double quantization that
differs from the recipe's is said, not silently swapped. The compute dtype is not part of what is stored: the
checkpoint's `bnb_4bit_compute_dtype` (often float16 or bfloat16, whatever its author trained in) is replaced by the
run's, so a checkpoint saved for fp16 does not make a bf16 or fp32 run compute in fp16. Other quantization methods
(GPTQ, AWQ, FP8, …) are refused: lora-dpo trains LoRA over a bitsandbytes base.
"""

from __future__ import annotations

import torch

from lora_dpo.errors import LoraDpoError


def stored(config) -> dict | None:
    """The quantization a checkpoint's config says it is stored in (a dict), or None for a full-precision one."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def _bits(qc: dict) -> int | None:
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        return 4
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return 8
    return None


def check(name: str, qc: dict | None, q) -> list[str]:
    """Raise LoraDpoError where the recipe's quantization (`q`) cannot apply to a checkpoint stored as `qc`;
    → notes for what the recipe asks that the stored weights fix otherwise (empty for an unquantized checkpoint)."""
    if not qc:
        return []
    method = qc.get("quant_method", "bitsandbytes")
    bits = _bits(qc)
    if method != "bitsandbytes" or bits is None:
        raise LoraDpoError(f"model.name_or_path: '{name}' is stored quantized with {method}; lora-dpo trains LoRA "
                           "over a bitsandbytes base: point it at the unquantized model (it is quantized to 4 bit "
                           "as it loads)")
    want = 4 if q.load_in_4bit else 8 if q.load_in_8bit else None
    if want != bits:
        asked = f"quantization.load_in_{want}bit: true" if want else "quantization.load_in_4bit: false"
        raise LoraDpoError(f"{asked}: '{name}' is stored in {bits} bit (a pre-quantized bitsandbytes checkpoint) and "
                           f"loads only in {bits} bit; set quantization.load_in_{bits}bit: true"
                           + (" and quantization.load_in_4bit: false" if bits == 8 else "")
                           + ", or point model.name_or_path at the unquantized model")
    if bits != 4:
        return []
    notes = []
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type != q.bnb_4bit_quant_type:
        notes.append(f"quantization.bnb_4bit_quant_type ({q.bnb_4bit_quant_type}) does not apply: '{name}' is "
                     f"stored as {quant_type}")
    double = bool(qc.get("bnb_4bit_use_double_quant", False))
    if double != q.bnb_4bit_use_double_quant:
        notes.append(f"quantization.bnb_4bit_use_double_quant ({str(q.bnb_4bit_use_double_quant).lower()}) does not "
                     f"apply: '{name}' is stored {'with' if double else 'without'} double quantization")
    return notes


def quant_type(qc: dict | None, q) -> str:
    """The 4-bit data type the base will compute with: the stored one for a pre-quantized checkpoint."""
    return qc.get("bnb_4bit_quant_type", "fp4") if qc else q.bnb_4bit_quant_type


def set_compute_dtype(model, dtype: torch.dtype) -> int:
    """Every 4-bit Linear of `model` computes in `dtype` (the run's, as a fresh quantization would set it), not in
    the compute dtype its checkpoint was saved with; → how many layers."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
            module.compute_type_is_set = True
            n += 1
    return n
