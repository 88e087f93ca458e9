"""Sequence-level preference losses over log-probs (pure torch, no Lightning).

Every loss maps per-pair tensors (P,) to a ``PairLoss``: a differentiable loss per pair and the detached
implicit rewards of both responses, for metrics. Inputs are the policy's sequence log-probs, sums over
the response tokens, or per-token means where ``LossSpec.length_normalised`` says so (the caller
computes whichever the table asks for); ``ref_*`` are the reference model's. Nothing is averaged here.

Formulas follow TRL: ``dpo_trainer`` (sigmoid, robust, hinge, ipo), ``cpo_trainer`` (simpo),
``orpo_trainer``, ``kto_trainer`` and ``reward_trainer``. ``kto`` and ``reward_pair`` take different
inputs and are separate entry points; ``pair_loss`` dispatches the paired ones by config name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.kd import _compute_dtype, _log1mexp_differentiable


@dataclass
class PairLoss:
    """A loss per pair (per sample for ``kto``) and the detached implicit rewards.

    For ``kto``, which is unpaired, ``chosen_rewards`` are the rewards of the desirable samples and
    ``rejected_rewards`` those of the undesirable ones, each 1-D of its own length, in input order.
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"preference losses take 1-D tensors of one shape (P,), got {shapes}")


def _checked(**tensors: Tensor) -> list[Tensor]:
    """The tensors, checked to be 1-D of one shape (P,), in float32 at least (bf16 log-probs would round
    the small differences DPO is made of)."""
    _check_shapes(**tensors)
    dtype = _compute_dtype(*tensors.values())
    return [t.to(dtype) for t in tensors.values()]


def _smoothed_logsigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) logsigmoid(x) - eps logsigmoid(-x): BCE against the label 1 - eps (cDPO)."""
    loss = -F.logsigmoid(logits) * (1.0 - label_smoothing)
    if label_smoothing:
        loss = loss - F.logsigmoid(-logits) * label_smoothing
    return loss


def _dpo_terms(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """h = (chosen - ref_chosen) - (rejected - ref_rejected) and the two detached rewards."""
    chosen, rejected, ref_chosen, ref_rejected = _checked(
        chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    return chosen_ratio - rejected_ratio, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo_sigmoid(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """DPO: -logsigmoid(beta h); label_smoothing eps > 0 is conservative DPO (cDPO)."""
    h, chosen_rewards, rejected_rewards = _dpo_terms(chosen, rejected, ref_chosen, ref_rejected, beta)
    return PairLoss(_smoothed_logsigmoid(beta * h, label_smoothing), chosen_rewards, rejected_rewards)


def dpo_robust(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """rDPO: ((1 - eps) (-logsigmoid(beta h)) + eps logsigmoid(-beta h)) / (1 - 2 eps).

    Unbiased for preference labels flipped at rate eps (Chowdhury et al. 2024), hence eps < 0.5.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h, chosen_rewards, rejected_rewards = _dpo_terms(chosen, rejected, ref_chosen, ref_rejected, beta)
    logits = beta * h
    loss = -F.logsigmoid(logits) * (1.0 - label_smoothing) + F.logsigmoid(-logits) * label_smoothing
    return PairLoss(loss / (1.0 - 2.0 * label_smoothing), chosen_rewards, rejected_rewards)


def dpo_hinge(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float = 0.1
) -> PairLoss:
    """SLiC hinge: relu(1 - beta h)."""
    h, chosen_rewards, rejected_rewards = _dpo_terms(chosen, rejected, ref_chosen, ref_rejected, beta)
    return PairLoss(torch.relu(1.0 - beta * h), chosen_rewards, rejected_rewards)


def ipo(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float = 0.1
) -> PairLoss:
    """IPO: (h - 1 / (2 beta))**2 over per-token mean log-probs (TRL's choice; the paper uses sums).

    The rewards are of the inputs, the means: the implicit reward logged as ``rewards/*`` is over the sums.
    """
    if beta <= 0:
        raise ValueError(f"ipo needs beta > 0, got {beta}")
    h, chosen_rewards, rejected_rewards = _dpo_terms(chosen, rejected, ref_chosen, ref_rejected, beta)
    return PairLoss((h - 1.0 / (2.0 * beta)) ** 2, chosen_rewards, rejected_rewards)


def simpo(
    chosen: Tensor, rejected: Tensor, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0
) -> PairLoss:
    """SimPO, reference-free over per-token mean log-probs: logits = beta (chosen - rejected) - gamma.

    gamma is the reward margin itself (TRL's ``simpo_gamma``; the paper's gamma/beta ratio is gamma / beta).
    """
    chosen, rejected = _checked(chosen=chosen, rejected=rejected)
    logits = beta * (chosen - rejected) - gamma
    loss = _smoothed_logsigmoid(logits, label_smoothing)
    return PairLoss(loss, beta * chosen.detach(), beta * rejected.detach())


def orpo(chosen: Tensor, rejected: Tensor, *, beta: float = 0.1) -> PairLoss:
    """ORPO over per-token mean log-probs: NLL(chosen) + beta * -logsigmoid(log odds ratio).

    beta is the paper's lambda. The log odds of a response are x - log(1 - exp(x)), computed stably for
    x near 0 (a response the policy is sure of), where log1p(-exp(x)) would be -inf and its gradient NaN.
    """
    chosen, rejected = _checked(chosen=chosen, rejected=rejected)
    log_odds = (chosen - rejected) - (_log1mexp_differentiable(chosen) - _log1mexp_differentiable(rejected))
    loss = -chosen - beta * F.logsigmoid(log_odds)
    return PairLoss(loss, beta * chosen.detach(), beta * rejected.detach())


def kto_kl_baseline(
    mismatched_logps: Tensor,
    mismatched_ref_logps: Tensor,
    mean_over_ranks: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """KTO's reference point z0: mean(policy - reference) over mismatched completions, clamped at 0, detached.

    ``mean_over_ranks`` (e.g. an all-reduce mean) averages each rank's mean over the ranks. As in TRL
    the mean over the batch and the ranks is clamped, not each difference nor each rank's mean (either
    would bias z0 upwards).
    """
    logps, ref_logps = _checked(mismatched_logps=mismatched_logps, mismatched_ref_logps=mismatched_ref_logps)
    if logps.numel() == 0:
        raise ValueError("kto_kl_baseline needs at least one mismatched completion")
    kl = (logps - ref_logps).mean().detach()
    if mean_over_ranks is not None:
        kl = mean_over_ranks(kl)
    return kl.clamp(min=0.0)


def kto(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_baseline: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PairLoss:
    """KTO per sample (P,), with r = logps - ref_logps and z0 = ``kl_baseline``.

    Desirable: w_d (1 - sigmoid(beta (r - z0))); undesirable: w_u (1 - sigmoid(beta (z0 - r))).
    z0 (see ``kto_kl_baseline``) is clamped at 0 and detached here, so no gradient flows through the
    reference point. Rewards: see ``PairLoss``.
    """
    _check_shapes(logps=logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"kto needs a bool desirable mask, got {desirable.dtype}")
    if kl_baseline.numel() != 1:
        raise ValueError(f"kto needs a scalar kl_baseline, got shape {tuple(kl_baseline.shape)}")
    logps, ref_logps = _checked(logps=logps, ref_logps=ref_logps)
    z0 = kl_baseline.detach().to(logps.dtype).reshape(()).clamp(min=0.0)
    ratio = logps - ref_logps
    loss = torch.where(
        desirable,
        desirable_weight * (1.0 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - ratio))),
    )
    rewards = beta * ratio.detach()
    return PairLoss(loss, rewards[desirable], rewards[~desirable])


def reward_pair(
    r_chosen: Tensor, r_rejected: Tensor, *, margin: Tensor | None = None, center_rewards: float = 0.0
) -> PairLoss:
    """Bradley-Terry reward-model loss: -logsigmoid(r_c - r_r - margin) + center_rewards (r_c + r_r)**2.

    The centring term (Eisenstein et al. 2023) keeps rewards near 0, where they are otherwise unanchored.
    """
    r_chosen, r_rejected = _checked(r_chosen=r_chosen, r_rejected=r_rejected)
    diff = r_chosen - r_rejected
    if margin is not None:
        _check_shapes(r_chosen=r_chosen, margin=margin)
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff)
    if center_rewards:
        loss = loss + center_rewards * (r_chosen + r_rejected) ** 2
    return PairLoss(loss, r_chosen.detach(), r_rejected.detach())


@dataclass(frozen=True)
class LossSpec:
    """What a paired loss needs of its caller."""

    fn: Callable[..., PairLoss]
    reference: bool
    """Needs the reference model's log-probs."""
    length_normalised: bool
    """Takes per-token mean log-probs instead of sums."""
    options: tuple[str, ...]
    """The keyword hyper-parameters it accepts."""


PAIR_LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(dpo_sigmoid, True, False, ("beta", "label_smoothing")),
    "robust": LossSpec(dpo_robust, True, False, ("beta", "label_smoothing")),
    "hinge": LossSpec(dpo_hinge, True, False, ("beta",)),
    "ipo": LossSpec(ipo, True, True, ("beta",)),
    "simpo": LossSpec(simpo, False, True, ("beta", "gamma", "label_smoothing")),
    "orpo": LossSpec(orpo, False, True, ("beta",)),
}
"""Paired losses by config name (``loss: sigmoid``)."""


def pair_loss(
    name: str,
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    **options: float,
) -> PairLoss:
    """Look ``name`` up in PAIR_LOSSES and call it with the options it accepts.

    Options another loss of the table accepts are dropped, so one config can carry beta, gamma and
    label_smoothing for all of them; an option no loss accepts is an error (a typo would otherwise be lost).
    A reference-free loss ignores ``ref_*``.
    """
    if name not in PAIR_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; choose one of {sorted(PAIR_LOSSES)}")
    known = {opt for spec in PAIR_LOSSES.values() for opt in spec.options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown preference loss options {unknown}; known are {sorted(known)}")
    spec = PAIR_LOSSES[name]
    kwargs = {k: v for k, v in options.items() if k in spec.options}
    if not spec.reference:
        return spec.fn(chosen, rejected, **kwargs)
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"preference loss {name!r} needs ref_chosen and ref_rejected (reference log-probs)")
    return spec.fn(chosen, rejected, ref_chosen, ref_rejected, **kwargs)
