"""Pairwise preference losses on per-sequence log-probabilities.

Pure tensor functions: every input is a (B,) tensor of one value per preference pair, nothing is modified in
place, and all arithmetic runs in fp32 whatever dtype comes in. The numbers follow TRL 1.16 (`DPOTrainer` for
the reference-based losses, `experimental.cpo.CPOTrainer` for SimPO) except where a docstring says otherwise.

Notation: π = policy log-prob summed over completion tokens, ref = the same under the reference model,
|y| = completion length in tokens, h = (π_c - ref_c) - (π_r - ref_r), β = `beta`, ε = `label_smoothing`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")
REFERENCE_FREE = frozenset({"simpo"})


@dataclass(frozen=True)
class LossOutput:
    losses: torch.Tensor  # (B,) per-pair loss, fp32
    chosen_rewards: torch.Tensor  # (B,) detached implicit rewards
    rejected_rewards: torch.Tensor  # (B,) detached


def sigmoid_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO loss, Rafailov et al. 2023 eq. 7, with conservative label smoothing (cDPO).

    logits: (B,) β·h. Returns (B,) -(1-ε)·logσ(β·h) - ε·logσ(-β·h); ε = 0 is eq. 7 exactly.

    Deliberate difference from TRL 1.16: its DPOTrainer "sigmoid" branch ignores `label_smoothing` altogether
    (only "robust", "exo_pair" and "aot*" read it), so the two agree only at ε = 0. The smoothed form is the one
    TRL's CPOTrainer and earlier DPOTrainer releases used.
    """
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def robust_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Robust DPO, Chowdhury et al. 2024 ("Provably Robust DPO"), the de-biased loss for flip rate ε.

    logits: (B,) β·h. Returns (B,) ((1-ε)·(-logσ(β·h)) - ε·(-logσ(-β·h))) / (1 - 2ε), as TRL 1.16 computes it.
    Unlike cDPO the flipped-label term is subtracted, which makes the loss an unbiased estimate of the clean
    DPO loss under random label flips; the 1/(1-2ε) factor is what blows up as ε -> 0.5, hence ε < 0.5.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    clean = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1.0 - 2.0 * label_smoothing)


def hinge_loss(logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of SLiC, Zhao et al. 2023, on the DPO log-ratio margin: relu(1 - β·h).

    logits: (B,) β·h. Returns (B,). β plays the role of 1/δ (the SLiC margin); matches TRL 1.16.
    """
    return torch.relu(1.0 - logits)


def ipo_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO, Azar et al. 2023 eq. 17 with τ = β: (h' - 1/(2β))².

    logits: (B,) h', the UNSCALED log-ratio margin. Returns (B,).
    The paper uses whole-sequence log-ratios; TRL 1.16 (and therefore `preference_loss`) passes per-token
    averages, h' = (π_c - ref_c)/|y_c| - (π_r - ref_r)/|y_r|, so the squared target does not scale with length.
    """
    return (logits - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(logits: torch.Tensor, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO, Meng et al. 2024 eq. 6: -logσ(β·(π_c/|y_c| - π_r/|y_r|) - γ), no reference model.

    logits: (B,) β·(π_c/|y_c| - π_r/|y_r|). Returns (B,). γ is the absolute reward margin of eq. 6. TRL 1.16's
    CPOTrainer stores it as γ/β and subtracts it before scaling by β, which is algebraically the same value.
    Like CPOTrainer, ε applies the cDPO smoothing of `sigmoid_loss`; ε = 0 is eq. 6 exactly.
    """
    return sigmoid_loss(logits - gamma, label_smoothing)


@dataclass(frozen=True)
class _Pairs:
    """Validated fp32 inputs, so each dispatch entry stays a one-liner."""

    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor | None
    rr: torch.Tensor | None
    lc: torch.Tensor
    lr: torch.Tensor
    beta: float
    eps: float
    gamma: float

    def margin(self) -> torch.Tensor:
        return (self.pc - self.rc) - (self.pr - self.rr)

    def avg_margin(self) -> torch.Tensor:
        return (self.pc - self.rc) / self.lc - (self.pr - self.rr) / self.lr


_DISPATCH: dict[str, Callable[[_Pairs], torch.Tensor]] = {
    "sigmoid": lambda p: sigmoid_loss(p.beta * p.margin(), p.eps),
    "ipo": lambda p: ipo_loss(p.avg_margin(), p.beta),
    "hinge": lambda p: hinge_loss(p.beta * p.margin()),
    "robust": lambda p: robust_loss(p.beta * p.margin(), p.eps),
    "simpo": lambda p: simpo_loss(p.beta * (p.pc / p.lc - p.pr / p.lr), p.gamma, p.eps),
}


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    rpo_alpha: float | None = None,
) -> LossOutput:
    """Per-pair preference loss and implicit rewards for one batch.

    policy_*_logps, reference_*_logps: (B,) log-probs summed over completion tokens; the reference pair may be
        None for a loss in REFERENCE_FREE (and is ignored there if given).
    chosen_lengths, rejected_lengths: (B,) completion token counts, float or integer; clamped to >= 1 as TRL does
        so an empty completion cannot divide by zero.
    label_smoothing: ε, read by "sigmoid", "robust" and "simpo"; ignored by "ipo" and "hinge", as in TRL.
    rpo_alpha: RPO, Pang et al. 2024: adds α·(-π_c/|y_c|), the chosen completion's mean per-token NLL, to every
        pair. TRL 1.16 has no `rpo_alpha`; its equivalent is loss_type=[<loss>, "sft"], loss_weights=[1, α], whose
        NLL is pooled over every chosen token in the batch, sum(-π_c)/sum(|y_c|). Averaging our per-pair term over
        the batch gives the same number only when all chosen lengths are equal; otherwise ours weights each pair
        equally rather than each token.

    Rewards are β·(π - ref) on SUMMED log-probs for every reference-based loss, IPO included (TRL logs these);
    for SimPO they are β·π/|y|, CPOTrainer's length-normalised reward. Both are detached.
    """
    if loss_type not in _DISPATCH:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if rpo_alpha is not None and rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0 or None, got {rpo_alpha}")
    reference_free = loss_type in REFERENCE_FREE
    if not reference_free and (reference_chosen_logps is None or reference_rejected_logps is None):
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs; only {sorted(REFERENCE_FREE)} do not")

    p = _Pairs(
        pc=policy_chosen_logps.float(),
        pr=policy_rejected_logps.float(),
        rc=None if reference_free else reference_chosen_logps.float(),
        rr=None if reference_free else reference_rejected_logps.float(),
        lc=chosen_lengths.float().clamp(min=1.0),
        lr=rejected_lengths.float().clamp(min=1.0),
        beta=float(beta),
        eps=float(label_smoothing),
        gamma=float(simpo_gamma),
    )
    losses = _DISPATCH[loss_type](p)
    if rpo_alpha:
        losses = losses + rpo_alpha * (-p.pc / p.lc)

    if reference_free:
        chosen_rewards, rejected_rewards = p.beta * p.pc / p.lc, p.beta * p.pr / p.lr
    else:
        chosen_rewards, rejected_rewards = p.beta * (p.pc - p.rc), p.beta * (p.pr - p.rr)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())
