"""The optimizer (AdamW, or bitsandbytes' 8-bit / paged 8-bit AdamW) and the learning-rate schedule.

`adamw_torch` is torch's fused AdamW where the parameters' device has its kernels (CUDA, CPU, …): one kernel updates
every adapter tensor where the default form launches a dozen per tensor group (CUDA) or loops over the tensors in
Python (CPU) — the same update to float rounding (tests/test_optim.py), and the AdamW TRL's DPOTrainer runs by
default (transformers' `adamw_torch_fused`).
"""

from __future__ import annotations

import math
import warnings

import torch

from lora_dpo.batching import epoch_shape
from lora_dpo.recipe import TrainConfig


def total_steps(cfg: TrainConfig, n_pairs: int, world: int = 1) -> int:
    """train.max_steps, or num_train_epochs of the epochs the batching cuts (batching.epoch_shape): whole optimizer
    steps within them, so no step reaches into an epoch beyond the last one asked for."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    micro, _ = epoch_shape(n_pairs, cfg.per_device_train_batch_size * world, cfg.gradient_accumulation_steps,
                           cfg.group_by_length)
    return max(1, math.floor(cfg.num_train_epochs * micro / cfg.gradient_accumulation_steps + 1e-9))


def epochs_line(cfg: TrainConfig, n_pairs: int, steps: int, world: int = 1) -> str:
    """What `steps` optimizer steps make of the data: how many epochs, and the pairs each epoch leaves out (the
    batches are whole, and a different few are left out each epoch)."""
    micro, left_out = epoch_shape(n_pairs, cfg.per_device_train_batch_size * world, cfg.gradient_accumulation_steps,
                                  cfg.group_by_length)
    epochs = steps * cfg.gradient_accumulation_steps / micro
    line = (f"{steps} optimizer step{'s' * (steps != 1)} = {epochs:.3g} epoch{'s' * (epochs != 1)} of {micro} "
            f"micro-batch{'es' * (micro != 1)}")
    if left_out:
        line += f"; each epoch leaves out {left_out} of the {n_pairs} pairs (a different {left_out} each epoch)"
    if cfg.gradient_accumulation_steps > micro:
        line += (f"; one step accumulates {cfg.gradient_accumulation_steps} micro-batches, more than an epoch holds, "
                 "so pairs repeat within a step")
    return line


def make_optimizer(model, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
              weight_decay=cfg.weight_decay)
    if cfg.optim in ("paged_adamw_8bit", "adamw_8bit"):
        import bitsandbytes as bnb

        with warnings.catch_warnings():  # on CPU the paged variant runs un-paged; bitsandbytes says so every step
            warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
            cls = bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
            return cls(params, **kw)
    return fused_adamw(params, **kw)


def fused_adamw(params: list, **kw) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernels; the default (foreach / per-tensor) form where the parameters' device or
    dtype has none (torch would refuse them at the first step)."""
    devices = _fused_devices()
    return torch.optim.AdamW(params, fused=all(p.is_floating_point() and p.device.type in devices
                                               for p in params) or None, **kw)


def _fused_devices() -> tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch that has moved it: CUDA has had the fused kernels longest
        return ("cuda",)
    return tuple(_get_fused_kernels_supported_devices())


def make_scheduler(optimizer, cfg: TrainConfig, steps: int):
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
