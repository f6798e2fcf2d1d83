"""The optimizer (AdamW, or bitsandbytes' 8-bit / paged 8-bit AdamW) and the learning-rate schedule."""

from __future__ import annotations

import math
import warnings

import torch

from lora_dpo.recipe import TrainConfig


def total_steps(cfg: TrainConfig, n_pairs: int, world: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    return max(1, math.ceil(cfg.num_train_epochs * n_pairs / per_step))


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
    return torch.optim.AdamW(params, **kw)


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
