"""The DPO objective on one batch: policy log-probs (adapter on) and reference log-probs (adapter off, no grad,
or read from a cache) → the loss and the per-pair metrics under the names TRL users read; and the step-0 check
that training starts with (a fresh adapter gives the loss at zero margin)."""

from __future__ import annotations

import math

import torch

from lora_dpo import losses
from lora_dpo import model as model_lib
from lora_dpo.batching import Batch
from lora_dpo.errors import LoraDpoError
from lora_dpo.logps import batch_logps
from lora_dpo.recipe import DpoConfig


def dpo_forward(model, batch: Batch, cfg: DpoConfig, reference_logps: tuple | None = None) -> tuple[torch.Tensor, dict]:
    """Reference (adapter off, no grad) and policy (adapter on) log-probs → loss and metric tensors.

    The reference pass runs first: its activations are freed as it goes, so the policy pass's saved activations
    (kept for backward) never share the peak with them."""
    if cfg.loss_type in losses.REFERENCE_FREE:
        rc = rr = None
    elif reference_logps is not None:
        rc, rr = reference_logps
    else:
        with model_lib.reference_mode(model):
            rc, rr = batch_logps(model, batch)[0].chunk(2)
    policy, n_tokens = batch_logps(model, batch)                      # (2B,)
    pc, pr = policy.chunk(2)
    nc, nr = n_tokens.chunk(2)
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


def step0_tolerance(dtype: torch.dtype, beta: float, tokens: int) -> float:
    """How far the step-0 loss and margins may stray from their exact values. In fp32, 1e-4. In bf16/fp16 the policy
    and reference passes do not round alike (the adapter branch, kernels picked per shape): each token's log-prob
    carries an error of about the dtype's epsilon, and a sequence's sum of n of them grows like √n, so β·√n·eps
    (measured on an H200, 8B model, bf16, 2048-token completions: margins up to 1.5e-3; this gives 0.035). A
    trained or perturbed adapter moves the margins by far more."""
    if dtype == torch.float32 or dtype == torch.float64:
        return 1e-4
    return max(1e-4, beta * math.sqrt(max(tokens, 1)) * torch.finfo(dtype).eps)


def _loss_at_zero_margin(cfg: DpoConfig, tol: float, tokens: int) -> tuple[float, float]:
    """→ (the loss at zero margin, how far margins within ±tol may move it). The margin tolerance is in reward units
    (β × log-ratio); a loss's slope there differs by type — IPO's, on length-averaged log-ratios, is 1/(β²·n) of the
    margin against sigmoid's 1/2 — so the loss's own tolerance is measured on the loss itself, at sequences of the
    batch's shortest length (the steepest for IPO)."""
    z, n = torch.zeros(1), torch.full((1,), float(max(tokens, 1)))

    def loss_at(h: float) -> float:
        return float(losses.preference_loss(z + h, z, z, z, n, n, loss_type=cfg.loss_type, beta=cfg.beta,
                                            label_smoothing=cfg.label_smoothing).losses[0])

    expected = loss_at(0.0)
    return expected, max(abs(loss_at(s * tol / cfg.beta) - expected) for s in (1, -1))


def _check_head(model, batch: Batch, dtype: torch.dtype) -> None:
    """The fast log-prob path against the model's own logits, on the batch's first row (up to 32 tokens), on sdpa
    (a flex_attention kernel would compile again for this one call), in eval mode."""
    from lora_dpo.attention import sdpa_for_generation
    from lora_dpo.logps import check_head

    ids = batch.input_ids[:1, :32]
    was_training = model.training
    model.eval()  # two forwards compared: dropout must not tell them apart (the step-0 margins look for it)
    try:
        with sdpa_for_generation(model), model_lib.autocast(ids.device, dtype):
            check_head(model, ids, 1e-3 if dtype in (torch.float32, torch.float64) else 0.1)
    finally:
        model.train(was_training)


def step0_check(model, batch: Batch, cfg: DpoConfig, say=print, reference_logps: tuple | None = None,
                dtype: torch.dtype = torch.float32) -> float | None:
    """With a fresh adapter (B = 0) policy == reference, so the loss is the loss at zero margin (ln 2 for DPO),
    within step0_tolerance of the compute dtype."""
    _check_head(model, batch, dtype)
    if cfg.loss_type in losses.REFERENCE_FREE:
        say(f"step-0 check: not applicable to the reference-free loss '{cfg.loss_type}'")
        return None
    with torch.no_grad():  # in the mode training runs in: dropout left on anywhere would show in the margins
        loss, metrics = dpo_forward(model, batch, cfg, reference_logps)
    tol = step0_tolerance(dtype, cfg.beta, int(batch.token_counts().max()))
    expected, loss_tol = _loss_at_zero_margin(cfg, tol, int(batch.token_counts().min()))
    margin = float(metrics["rewards/margins"].abs().max())
    # the RPO term adds the chosen NLL, which is not zero at step 0
    if cfg.rpo_alpha:
        expected += float((cfg.rpo_alpha * -metrics["logps/chosen"]
                           / batch.token_counts().chunk(2)[0].clamp(min=1)).mean())
    name = "ln 2" if abs(expected - math.log(2)) < 1e-6 else f"{expected:.6f}"
    if cfg.rpo_alpha and cfg.loss_type in ("sigmoid", "robust"):
        name = f"ln 2 + RPO NLL {expected - math.log(2):.6f}"
    if abs(float(loss) - expected) > max(tol, loss_tol) or margin > tol:
        raise LoraDpoError(f"step-0 check failed: loss {float(loss):.6f} ≠ {name}, max |margin| {margin:.2e} "
                           f"(tolerance {tol:.1e}); the reference is not the policy with its adapter off (a model "
                           "with dropout or a non-fresh adapter?)")
    within = "" if tol <= 1e-4 else f" (within {tol:.1e}, {str(dtype).removeprefix('torch.')} rounding)"
    say(f"step-0 check: loss {float(loss):.6f} = {name} ✓, margins 0 ✓{within}")
    return float(loss)
