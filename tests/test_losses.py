"""Losses against values worked out by hand with `math`, one scalar at a time."""

import math

import pytest
import torch

from lora_dpo.losses import (
    LOSS_TYPES,
    REFERENCE_FREE,
    LossOutput,
    hinge_loss,
    ipo_loss,
    preference_loss,
    robust_loss,
    sigmoid_loss,
    simpo_loss,
)

# Three pairs with distinct numbers; margins h = (pc - rc) - (pr - rr) are 1.5, -3.0, 1.25.
PC = [-10.0, -22.5, -7.25]
PR = [-12.0, -20.0, -9.5]
RC = [-11.0, -21.0, -8.0]
RR = [-11.5, -21.5, -9.0]
LC = [4, 9, 3]
LR = [5, 7, 6]


def log_sigmoid(x):
    return math.log(1 / (1 + math.exp(-x)))


def margins():
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def batch(pc=PC, pr=PR, rc=RC, rr=RR, lc=LC, lr=LR):
    return (
        torch.tensor(pc),
        torch.tensor(pr),
        None if rc is None else torch.tensor(rc),
        None if rr is None else torch.tensor(rr),
        torch.tensor(lc),
        torch.tensor(lr),
    )


def run(loss_type, beta, **kw):
    return preference_loss(*batch(), loss_type=loss_type, beta=beta, **kw)


def assert_close(actual, expected):
    assert actual.shape == (len(expected),)
    assert actual.dtype == torch.float32
    assert actual.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_constants():
    assert LOSS_TYPES == ("sigmoid", "ipo", "hinge", "robust", "simpo")
    assert REFERENCE_FREE == frozenset({"simpo"})
    assert margins() == [1.5, -3.0, 1.25]


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_sigmoid_plain_dpo(beta):
    out = run("sigmoid", beta)
    assert isinstance(out, LossOutput)
    assert_close(out.losses, [-math.log(1 / (1 + math.exp(-beta * h))) for h in margins()])


def test_sigmoid_label_smoothing():
    beta, eps = 0.5, 0.2
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in margins()]
    assert_close(run("sigmoid", beta, label_smoothing=eps).losses, expected)
    # Smoothing penalises confidence: it raises the loss on the pairs the policy already ranks correctly.
    plain = run("sigmoid", beta).losses
    smoothed = run("sigmoid", beta, label_smoothing=eps).losses
    assert smoothed[0] > plain[0] and smoothed[2] > plain[2]
    assert smoothed[1] < plain[1]


def test_sigmoid_half_smoothing_ignores_the_label():
    # At ε = 0.5 the label carries no information: swapping chosen and rejected changes nothing.
    beta = 0.9
    expected = [0.5 * (math.log(1 + math.exp(-beta * h)) + math.log(1 + math.exp(beta * h))) for h in margins()]
    out = run("sigmoid", beta, label_smoothing=0.5).losses
    swapped = preference_loss(
        *batch(pc=PR, pr=PC, rc=RR, rr=RC, lc=LR, lr=LC), loss_type="sigmoid", beta=beta, label_smoothing=0.5
    ).losses
    assert_close(out, expected)
    assert_close(swapped, expected)
    assert all(v > math.log(2) for v in expected)


def test_robust():
    beta, eps = 0.4, 0.1
    expected = [((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps) for h in margins()]
    assert_close(run("robust", beta, label_smoothing=eps).losses, expected)
    # With no flips assumed, robust DPO is plain DPO.
    assert_close(run("robust", beta).losses, [-log_sigmoid(beta * h) for h in margins()])


@pytest.mark.parametrize("eps", [0.5, 0.7])
def test_robust_rejects_half_or_more(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        run("robust", 0.1, label_smoothing=eps)


def test_hinge():
    # β = 1 puts pairs 0 and 2 past the margin (loss 0) and pair 1 inside it.
    assert_close(run("hinge", 1.0).losses, [0.0, 4.0, 0.0])
    assert_close(run("hinge", 0.1).losses, [max(0.0, 1 - 0.1 * h) for h in margins()])


def test_ipo_uses_length_averaged_log_ratios():
    beta = 0.5
    avg = [(pc - rc) / lc - (pr - rr) / lr for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR)]
    expected = [(a - 1 / (2 * beta)) ** 2 for a in avg]
    summed = [(h - 1 / (2 * beta)) ** 2 for h in margins()]
    # The two conventions must differ on this batch, or the test could not tell them apart.
    assert all(abs(e - s) > 0.1 for e, s in zip(expected, summed))
    assert_close(run("ipo", beta).losses, expected)


def test_simpo():
    beta, gamma = 2.0, 0.3
    expected = [-log_sigmoid(beta * (pc / lc - pr / lr) - gamma) for pc, pr, lc, lr in zip(PC, PR, LC, LR)]
    no_ref = preference_loss(*batch(rc=None, rr=None), loss_type="simpo", beta=beta, simpo_gamma=gamma)
    assert_close(no_ref.losses, expected)
    # Reference log-probs, when passed anyway, must not leak into a reference-free loss.
    assert_close(run("simpo", beta, simpo_gamma=gamma).losses, expected)


def test_simpo_label_smoothing():
    # Same cDPO smoothing as TRL's CPOTrainer applies to its "simpo" loss.
    beta, gamma, eps = 2.0, 0.3, 0.15
    z = [beta * (pc / lc - pr / lr) - gamma for pc, pr, lc, lr in zip(PC, PR, LC, LR)]
    expected = [-(1 - eps) * log_sigmoid(v) - eps * log_sigmoid(-v) for v in z]
    assert_close(run("simpo", beta, simpo_gamma=gamma, label_smoothing=eps).losses, expected)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_zero_margin_is_ln2(loss_type, eps):
    out = preference_loss(*batch(rc=PC, rr=PR), loss_type=loss_type, beta=0.3, label_smoothing=eps)
    assert_close(out.losses, [math.log(2)] * 3)


def test_zero_margin_hinge_and_ipo():
    zero = batch(rc=PC, rr=PR)
    assert_close(preference_loss(*zero, loss_type="hinge", beta=0.3).losses, [1.0] * 3)
    assert_close(preference_loss(*zero, loss_type="ipo", beta=0.3).losses, [(1 / (2 * 0.3)) ** 2] * 3)


def test_zero_margin_simpo():
    gamma = 0.8
    # Equal per-token averages: -8/4 = -10/5, -18/9 = -14/7, -6/3 = -12/6.
    out = preference_loss(
        *batch(pc=[-8.0, -18.0, -6.0], pr=[-10.0, -14.0, -12.0], rc=None, rr=None),
        loss_type="simpo",
        beta=1.5,
        simpo_gamma=gamma,
    )
    assert_close(out.losses, [-log_sigmoid(-gamma)] * 3)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "simpo"])
def test_raising_chosen_logp_lowers_loss(loss_type):
    pc, pr, rc, rr, lc, lr = batch()
    pc.requires_grad_(True)
    out = preference_loss(pc, pr, rc, rr, lc, lr, loss_type=loss_type, beta=0.1, label_smoothing=0.1)
    out.losses.sum().backward()
    assert (pc.grad < 0).all()
    bumped = preference_loss(pc.detach() + 0.5, pr, rc, rr, lc, lr, loss_type=loss_type, beta=0.1, label_smoothing=0.1)
    assert (bumped.losses < out.losses.detach()).all()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_rewards_reference_based(loss_type):
    beta = 0.25
    pc, pr, rc, rr, lc, lr = batch()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    out = preference_loss(pc, pr, rc, rr, lc, lr, loss_type=loss_type, beta=beta)
    # Summed, not length-averaged, log-ratios even for IPO: that is what TRL logs.
    assert_close(out.chosen_rewards, [beta * (a - b) for a, b in zip(PC, RC)])
    assert_close(out.rejected_rewards, [beta * (a - b) for a, b in zip(PR, RR)])
    for r in (out.chosen_rewards, out.rejected_rewards):
        assert not r.requires_grad and r.grad_fn is None
    assert out.losses.requires_grad


def test_rewards_simpo():
    beta = 2.0
    out = preference_loss(*batch(rc=None, rr=None), loss_type="simpo", beta=beta)
    assert_close(out.chosen_rewards, [beta * p / n for p, n in zip(PC, LC)])
    assert_close(out.rejected_rewards, [beta * p / n for p, n in zip(PR, LR)])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rpo_adds_alpha_times_chosen_nll(loss_type):
    alpha = 0.3
    base = run(loss_type, 0.2).losses
    with_rpo = run(loss_type, 0.2, rpo_alpha=alpha).losses
    assert_close(with_rpo - base, [alpha * (-p / n) for p, n in zip(PC, LC)])


def test_rpo_none_and_zero_are_off():
    base = run("sigmoid", 0.2).losses
    assert torch.equal(run("sigmoid", 0.2, rpo_alpha=None).losses, base)
    assert torch.equal(run("sigmoid", 0.2, rpo_alpha=0.0).losses, base)


def test_hinge_and_ipo_ignore_label_smoothing():
    for loss_type in ("hinge", "ipo"):
        assert torch.equal(run(loss_type, 0.3, label_smoothing=0.2).losses, run(loss_type, 0.3).losses)


def test_unknown_loss_type():
    with pytest.raises(ValueError) as info:
        run("dpo", 0.1)
    for name in LOSS_TYPES:
        assert name in str(info.value)


def test_missing_reference_rejected():
    with pytest.raises(ValueError, match="reference"):
        preference_loss(*batch(rc=None, rr=None), loss_type="sigmoid", beta=0.1)


@pytest.mark.parametrize("kw", [{"beta": 0.0}, {"beta": -1.0}, {"beta": 0.1, "label_smoothing": -0.1}])
def test_bad_hyperparameters(kw):
    with pytest.raises(ValueError):
        run("sigmoid", **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_inputs_not_modified(loss_type):
    inputs = batch()
    copies = [t.clone() for t in inputs]
    versions = [t._version for t in inputs]
    run_out = preference_loss(*inputs, loss_type=loss_type, beta=0.2, label_smoothing=0.1, rpo_alpha=0.5)
    assert all(torch.equal(t, c) for t, c in zip(inputs, copies))
    assert [t._version for t in inputs] == versions
    assert inputs[4].dtype == torch.int64  # lengths came in as long and stay long
    assert run_out.losses.dtype == torch.float32


def test_low_precision_inputs_computed_in_fp32():
    pc, pr, rc, rr, lc, lr = batch()
    out = preference_loss(
        pc.double(), pr.bfloat16(), rc.half(), rr.double(), lc.float(), lr, loss_type="sigmoid", beta=0.1
    )
    for t in (out.losses, out.chosen_rewards, out.rejected_rewards):
        assert t.dtype == torch.float32
    # These particular values are exact in bf16/fp16, so the answer must equal the fp32 one.
    assert_close(out.losses, [-log_sigmoid(0.1 * h) for h in margins()])


def test_per_loss_functions_directly():
    x = torch.tensor([0.0, 2.0])
    assert sigmoid_loss(x).tolist() == pytest.approx([math.log(2), -log_sigmoid(2.0)], rel=1e-6)
    assert robust_loss(x, 0.0).tolist() == pytest.approx(sigmoid_loss(x).tolist(), rel=1e-6)
    assert hinge_loss(x).tolist() == [1.0, 0.0]
    assert ipo_loss(x, 0.25).tolist() == pytest.approx([4.0, 0.0])
    assert simpo_loss(x, 0.5).tolist() == pytest.approx([-log_sigmoid(-0.5), -log_sigmoid(1.5)], rel=1e-6)
