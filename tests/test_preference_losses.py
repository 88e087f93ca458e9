"""Preference losses against naive per-element references written with ``math`` on Python floats."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from distill.losses.preference import (
    PAIR_LOSSES,
    dpo_hinge,
    dpo_robust,
    dpo_sigmoid,
    ipo,
    kto,
    kto_kl_baseline,
    orpo,
    pair_loss,
    reward_pair,
    simpo,
)

P = 9


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logps(seed: int, low: float, high: float, n: int = P) -> Tensor:
    """(n,) float64 log-probs in [-high, -low]."""
    g = torch.Generator().manual_seed(seed)
    return -(low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64))


def quad(low: float = 1.0, high: float = 30.0) -> list[Tensor]:
    """chosen, rejected, ref_chosen, ref_rejected."""
    return [logps(seed, low, high) for seed in range(4)]


def naive_dpo(name: str, c: float, r: float, rc: float, rr: float, beta: float, eps: float) -> float:
    h = (c - rc) - (r - rr)
    if name == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if name == "robust":
        return ((1 - eps) * -log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if name == "hinge":
        return max(0.0, 1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2  # ipo


@pytest.mark.parametrize(
    ("name", "fn", "eps"),
    [
        ("sigmoid", dpo_sigmoid, 0.0),
        ("sigmoid", dpo_sigmoid, 0.2),
        ("robust", dpo_robust, 0.3),
        ("hinge", dpo_hinge, None),
        ("ipo", ipo, None),
    ],
)
def test_dpo_family_against_naive(name, fn, eps):
    beta = 0.3
    c, r, rc, rr = quad(0.05, 3.0) if name == "ipo" else quad()
    kwargs = {"beta": beta} if eps is None else {"beta": beta, "label_smoothing": eps}
    out = fn(c, r, rc, rr, **kwargs)
    for i in range(P):
        args = (c[i].item(), r[i].item(), rc[i].item(), rr[i].item())
        assert out.loss[i].item() == pytest.approx(naive_dpo(name, *args, beta, eps or 0.0), rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (args[0] - args[2]), rel=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (args[1] - args[3]), rel=1e-12)
    assert out.loss.shape == (P,)


def test_simpo_against_naive():
    c, r = logps(0, 0.05, 3.0), logps(1, 0.05, 3.0)
    beta, gamma, eps = 2.5, 0.7, 0.1
    out = simpo(c, r, beta=beta, gamma=gamma, label_smoothing=eps)
    for i in range(P):
        x = beta * (c[i].item() - r[i].item()) - gamma
        assert out.loss[i].item() == pytest.approx(-(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x))
        assert out.chosen_rewards[i].item() == pytest.approx(beta * c[i].item())
        assert out.rejected_rewards[i].item() == pytest.approx(beta * r[i].item())


def test_orpo_against_naive():
    c, r = logps(0, 0.05, 3.0), logps(1, 0.05, 3.0)
    beta = 0.25
    out = orpo(c, r, beta=beta)
    for i in range(P):
        ci, ri = c[i].item(), r[i].item()
        log_odds = (ci - ri) - (math.log(1 - math.exp(ci)) - math.log(1 - math.exp(ri)))
        assert out.loss[i].item() == pytest.approx(-ci - beta * log_sigmoid(log_odds), rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * ci)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * ri)


def kto_inputs() -> tuple[Tensor, Tensor, Tensor]:
    desirable = torch.tensor([True, False, True, True, False, False, True, False, True])
    return logps(0, 1.0, 30.0), logps(1, 1.0, 30.0), desirable


def test_kto_against_naive():
    lp, ref, desirable = kto_inputs()
    beta, wd, wu, z0 = 0.2, 1.5, 0.7, 0.4
    out = kto(
        lp,
        ref,
        desirable,
        torch.tensor(z0, dtype=torch.float64),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    chosen, rejected = [], []
    for i in range(P):
        ratio = lp[i].item() - ref[i].item()
        if desirable[i]:
            expected = wd * (1 - sigmoid(beta * (ratio - z0)))
            chosen.append(beta * ratio)
        else:
            expected = wu * (1 - sigmoid(beta * (z0 - ratio)))
            rejected.append(beta * ratio)
        assert out.loss[i].item() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx(chosen)
    assert out.rejected_rewards.tolist() == pytest.approx(rejected)


def test_kto_baseline_detached_and_clamped():
    lp, ref, desirable = kto_inputs()
    lp = lp.clone().requires_grad_()
    z0 = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    out = kto(lp, ref, desirable, z0)
    out.loss.sum().backward()
    assert z0.grad is None
    assert lp.grad is not None
    assert_close(out.loss, kto(lp, ref, desirable, torch.tensor(0.0)).loss)
    assert not torch.allclose(out.loss, kto(lp, ref, desirable, torch.tensor(0.5)).loss)


def test_kto_kl_baseline():
    a, b = logps(0, 1.0, 5.0, 6), logps(1, 1.0, 5.0, 6)
    a.requires_grad_()
    mean = sum(x - y for x, y in zip(a.tolist(), b.tolist(), strict=True)) / 6
    z0 = kto_kl_baseline(a, b)
    assert not z0.requires_grad
    assert z0.item() == pytest.approx(max(mean, 0.0))
    # the mean is clamped, not each difference: one large positive difference among negatives
    diffs = torch.tensor([3.0, -1.0, -1.5], dtype=torch.float64)
    assert kto_kl_baseline(diffs, torch.zeros(3, dtype=torch.float64)).item() == pytest.approx(0.5 / 3)
    assert kto_kl_baseline(-diffs, torch.zeros(3, dtype=torch.float64)).item() == 0.0
    # another rank's mean of 1.0: the mean over the ranks, (-0.5 / 3 + 1) / 2, is what is clamped
    other_rank = lambda kl: (kl + 1.0) / 2  # noqa: E731
    z0 = kto_kl_baseline(-diffs, torch.zeros(3, dtype=torch.float64), other_rank)
    assert z0.item() == pytest.approx((1.0 - 0.5 / 3) / 2)
    with pytest.raises(ValueError, match="at least one"):
        kto_kl_baseline(torch.zeros(0), torch.zeros(0))


def test_kto_rejects_bad_inputs():
    lp, ref, desirable = kto_inputs()
    with pytest.raises(ValueError, match="bool"):
        kto(lp, ref, desirable.long(), torch.tensor(0.0))
    with pytest.raises(ValueError, match="scalar"):
        kto(lp, ref, desirable, torch.zeros(2))


def test_reward_pair_margin_and_center():
    rc, rr, margin = logps(0, -2.0, 2.0), logps(1, -2.0, 2.0), logps(2, 0.0, 1.0).neg()
    out = reward_pair(rc, rr, margin=margin, center_rewards=0.05)
    for i in range(P):
        c, r, m = rc[i].item(), rr[i].item(), margin[i].item()
        assert out.loss[i].item() == pytest.approx(-log_sigmoid(c - r - m) + 0.05 * (c + r) ** 2, rel=1e-12)
    assert_close(out.chosen_rewards, rc)
    assert_close(out.rejected_rewards, rr)
    assert_close(reward_pair(rc, rr).loss, reward_pair(rc, rr, margin=torch.zeros(P)).loss)
    assert not torch.allclose(reward_pair(rc, rr).loss, out.loss)


def _gradcheck_cases():
    c, r, rc, rr = quad()
    cn, rn, rcn, rrn = quad(0.05, 3.0)
    lp, ref, desirable = kto_inputs()
    return [
        ("sigmoid", lambda a, b: dpo_sigmoid(a, b, rc, rr, beta=0.2, label_smoothing=0.1).loss, c, r),
        ("robust", lambda a, b: dpo_robust(a, b, rc, rr, beta=0.2, label_smoothing=0.2).loss, c, r),
        ("hinge", lambda a, b: dpo_hinge(a, b, rc, rr, beta=0.02).loss, c, r),
        ("ipo", lambda a, b: ipo(a, b, rcn, rrn, beta=0.3).loss, cn, rn),
        ("simpo", lambda a, b: simpo(a, b, label_smoothing=0.1).loss, cn, rn),
        ("orpo", lambda a, b: orpo(a, b, beta=0.5).loss, cn, rn),
        ("kto", lambda a, b: kto(a, b, desirable, torch.tensor(0.3), beta=0.2, desirable_weight=2.0).loss,
         lp, ref),
        ("reward", lambda a, b: reward_pair(a, b, margin=rc.neg() / 30, center_rewards=0.1).loss, c / 10,
         r / 10),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _gradcheck_cases(), ids=lambda case: case[0])
def test_gradcheck(case):
    _, fn, a, b = case
    assert torch.autograd.gradcheck(
        fn, (a.clone().requires_grad_(), b.clone().requires_grad_()), fast_mode=True
    )


def test_dpo_sigmoid_analytic_gradient():
    c, r, rc, rr = quad()
    beta, eps = 0.2, 0.15
    c.requires_grad_()
    r.requires_grad_()
    dpo_sigmoid(c, r, rc, rr, beta=beta, label_smoothing=eps).loss.sum().backward()
    for i in range(P):
        h = (c[i].item() - rc[i].item()) - (r[i].item() - rr[i].item())
        # d/dh of -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h)
        dh = -beta * (1 - eps) * sigmoid(-beta * h) + beta * eps * sigmoid(beta * h)
        assert c.grad[i].item() == pytest.approx(dh, rel=1e-12)
        assert r.grad[i].item() == pytest.approx(-dh, rel=1e-12)


def test_dpo_sigmoid_without_smoothing_is_plain_dpo():
    c, r, rc, rr = quad()
    h = (c - rc) - (r - rr)
    assert_close(dpo_sigmoid(c, r, rc, rr, beta=0.1).loss, -torch.nn.functional.logsigmoid(0.1 * h))


def test_hinge_zero_past_margin():
    c, r, rc, rr = quad()
    beta = 0.5
    h = (c - rc) - (r - rr)
    out = dpo_hinge(c, r, rc, rr, beta=beta)
    past = beta * h >= 1
    assert past.any() and (~past).any()
    assert (out.loss[past] == 0).all()
    assert (out.loss[~past] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_finite_near_zero(dtype):
    c = torch.tensor([-1e-6, 0.0, -1e-9, -0.5], dtype=dtype, requires_grad=True)
    r = torch.tensor([-0.5, -1e-6, -1e-6, 0.0], dtype=dtype, requires_grad=True)
    out = orpo(c, r, beta=0.5)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    # a near-certain chosen response against a likely rejected one: odds ratio term ~ 0, NLL ~ 0
    log_odds = (-1e-6 + 0.5) - (math.log(-math.expm1(-1e-6)) - math.log(-math.expm1(-0.5)))
    assert out.loss[0].item() == pytest.approx(1e-6 - 0.5 * log_sigmoid(log_odds), rel=1e-3)
    assert out.loss[0].item() < 1e-5


@pytest.mark.parametrize("eps", [0.5, 0.7])
def test_robust_rejects_half_smoothing(eps):
    with pytest.raises(ValueError, match=r"label_smoothing < 0\.5"):
        dpo_robust(*quad(), label_smoothing=eps)


def test_ipo_rejects_nonpositive_beta():
    with pytest.raises(ValueError, match="beta > 0"):
        ipo(*quad(), beta=0.0)


def test_rewards_detached():
    c, r, rc, rr = (t.requires_grad_() for t in quad(0.05, 3.0))
    lp, ref, desirable = kto_inputs()
    outs = [pair_loss(name, c, r, rc, rr) for name in PAIR_LOSSES]
    outs += [kto(lp.requires_grad_(), ref, desirable, torch.tensor(0.1)), reward_pair(c, r)]
    for out in outs:
        assert out.loss.requires_grad
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_pair_loss_drops_options_it_does_not_accept():
    c, r, rc, rr = quad()
    opts = {"beta": 0.3, "gamma": 0.9, "label_smoothing": 0.1}
    assert_close(pair_loss("hinge", c, r, rc, rr, **opts).loss, dpo_hinge(c, r, rc, rr, beta=0.3).loss)
    assert_close(
        pair_loss("sigmoid", c, r, rc, rr, **opts).loss,
        dpo_sigmoid(c, r, rc, rr, beta=0.3, label_smoothing=0.1).loss,
    )
    # reference-free: the reference log-probs are ignored
    assert_close(pair_loss("simpo", c, r, rc, rr, **opts).loss, simpo(c, r, **opts).loss)
    assert_close(pair_loss("orpo", c / 30, r / 30, **opts).loss, orpo(c / 30, r / 30, beta=0.3).loss)


def test_pair_loss_errors():
    c, r, rc, rr = quad()
    with pytest.raises(ValueError, match=r"unknown preference loss 'dpo'.*'hinge'.*'sigmoid'"):
        pair_loss("dpo", c, r, rc, rr)
    with pytest.raises(ValueError, match="needs ref_chosen and ref_rejected"):
        pair_loss("ipo", c, r)
    with pytest.raises(ValueError, match="needs ref_chosen and ref_rejected"):
        pair_loss("sigmoid", c, r, rc)
    with pytest.raises(ValueError, match=r"options \['betta'\]"):
        pair_loss("sigmoid", c, r, rc, rr, betta=0.1)


def test_shape_mismatch_is_an_error():
    c, r, rc, rr = quad()
    with pytest.raises(ValueError, match="one shape"):
        dpo_sigmoid(c, r[:-1], rc, rr)
    with pytest.raises(ValueError, match="one shape"):
        simpo(c[:, None], r[:, None])
    with pytest.raises(ValueError, match="one shape"):
        reward_pair(c, r, margin=torch.zeros(P + 1))


def test_table_matches_signatures():
    for name, spec in PAIR_LOSSES.items():
        params = inspect.signature(spec.fn).parameters.values()
        kw_only = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert spec.options == kw_only, name
        assert len(positional) == (4 if spec.reference else 2), name
    assert {n for n, s in PAIR_LOSSES.items() if s.length_normalised} == {"ipo", "simpo", "orpo"}


def test_bf16_inputs_are_upcast():
    c, r, rc, rr = (t.to(torch.bfloat16) for t in quad())
    assert dpo_sigmoid(c, r, rc, rr).loss.dtype == torch.float32
