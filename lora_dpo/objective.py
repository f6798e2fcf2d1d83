"""The DPO objective on one batch: policy log-probs (adapter on) and reference log-probs (adapter off, no grad,
or read from a cache) → the loss and the per-pair metrics under the names TRL users read."""

from __future__ import annotations

import torch

from lora_dpo import losses
from lora_dpo import model as model_lib
from lora_dpo.batching import Batch
from lora_dpo.logps import batch_logps
from lora_dpo.recipe import DpoConfig


def dpo_forward(model, batch: Batch, cfg: DpoConfig, reference_logps: tuple | None = None) -> tuple[torch.Tensor, dict]:
    """Policy (adapter on) and reference (adapter off, no grad) log-probs → loss and metric tensors."""
    policy, n_tokens = batch_logps(model, batch)                      # (2B,)
    pc, pr = policy.chunk(2)
    nc, nr = n_tokens.chunk(2)
    if cfg.loss_type in losses.REFERENCE_FREE:
        rc = rr = None
    elif reference_logps is not None:
        rc, rr = reference_logps
    else:
        with model_lib.reference_mode(model):
            rc, rr = batch_logps(model, batch)[0].chunk(2)
    out = losses.preference_loss(pc, pr, rc, rr, nc, nr, loss_type=cfg.loss_type, beta=cfg.beta,
                                 label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                                 rpo_alpha=cfg.rpo_alpha)
    metrics = {
        "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
        "logps/chosen": pc.detach(), "logps/rejected": pr.detach(),
    }
    return out.losses.mean(), metrics


class MetricMeter:
    """Averages per-pair metric tensors over the micro-batches of a logging window."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.pairs = 0
        self.loss_sum = 0.0
        self.batches = 0

    def add(self, loss: torch.Tensor, metrics: dict) -> None:
        self.loss_sum += float(loss)
        self.batches += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.sum())
        self.pairs += int(next(iter(metrics.values())).numel())

    def merge(self, other: MetricMeter) -> None:
        self.loss_sum += other.loss_sum
        self.batches += other.batches
        self.pairs += other.pairs
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def reduce(self, ctx, device: torch.device) -> None:
        """Sum the window over data-parallel processes (a no-op in a single process)."""
        keys = sorted(self.sums)
        values = ctx.sum([self.loss_sum, self.batches, self.pairs] + [self.sums[k] for k in keys], device)
        self.loss_sum, self.batches, self.pairs = values[0], int(values[1]), int(values[2])
        self.sums = dict(zip(keys, values[3:]))

    def result(self, prefix: str = "") -> dict:
        out = {f"{prefix}loss": self.loss_sum / max(self.batches, 1)}
        out.update({f"{prefix}{k}": v / max(self.pairs, 1) for k, v in self.sums.items()})
        return out
