"""Policy-gradient losses over sampled completions (pure torch, no Lightning): GRPO and RLOO.

Completions come in groups: the G samples of one prompt are consecutive (sequences gG .. gG + G - 1).
Token tensors are flat (N,), in the order the student's ``LossInputs`` gives the completion tokens, with
``sequence`` (N,) saying which completion each token is of. Nothing is averaged over the batch here:
every reduction returns a sum and the number of units it is over, and the training step divides by the
units of the whole optimizer step.

Formulas follow TRL's ``grpo_trainer`` (advantages, the clipped ratio with DAPO's two epsilons, the k3
KL estimator, the ``grpo`` / ``dr_grpo`` / ``dapo`` normalisers) and ``rloo_trainer`` (the
leave-one-out baseline; REINFORCE on the sequence log-prob, as in Ahmadian et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Normaliser = Literal["grpo", "dr_grpo", "dapo"]
NORMALISERS: tuple[str, ...] = ("grpo", "dr_grpo", "dapo")


def _groups(values: Tensor, group_size: int) -> Tensor:
    if values.dim() != 1 or group_size < 1 or values.numel() % group_size:
        raise ValueError(
            f"rewards (S,) must hold whole groups of {group_size}: got shape {tuple(values.shape)}"
        )
    return values.float().view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """(S,) each reward minus its group's mean, divided by the group's std (+ eps) when ``scale``
    (GRPO); ``scale=False`` is Dr. GRPO, which drops the std as a difficulty bias."""
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """(S,) each reward minus the mean of the other G - 1 rewards of its group (RLOO's baseline)."""
    if group_size < 2:
        raise ValueError("RLOO's leave-one-out baseline needs at least 2 completions per prompt")
    groups = _groups(rewards, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(policy || reference) by Schulman's k3 estimator, exp(r - l) - (r - l) - 1 >= 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1.0


@dataclass
class Surrogate:
    """The clipped surrogate per token, and where the clip took the gradient away."""

    loss: Tensor  # (N,) -min(ratio * A, clip(ratio) * A)
    ratio: Tensor  # (N,) detached pi / pi_old
    clipped_low: Tensor  # (N,) bool: ratio below 1 - epsilon_low with A < 0
    clipped_high: Tensor  # (N,) bool: ratio above 1 + epsilon_high with A > 0


def clipped_surrogate(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float
) -> Surrogate:
    """PPO's clipped objective per token, with DAPO's separate low and high clip bounds."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    ratio = ratio.detach()
    low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
    high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    return Surrogate(loss=loss, ratio=ratio, clipped_low=low, clipped_high=high)


def reduce_tokens(
    per_token: Tensor,
    sequence: Tensor,
    num_sequences: int,
    normaliser: Normaliser,
    max_completion_length: int,
) -> tuple[Tensor, int]:
    """(sum, units) of a per-token loss, the step's loss being sum over units:

    - ``grpo``: each completion's token mean; units are completions (a long completion's tokens weigh
      less, the length bias Dr. GRPO points out);
    - ``dr_grpo``: each completion's token sum / ``max_completion_length``; units are completions;
    - ``dapo``: the token sum; units are tokens (every token of the step weighs the same).
    """
    if normaliser == "dapo":
        return per_token.sum(), per_token.numel()
    if normaliser == "dr_grpo":
        return per_token.sum() / max_completion_length, num_sequences
    if normaliser == "grpo":
        sums = per_token.new_zeros(num_sequences).index_add(0, sequence, per_token)
        tokens = torch.bincount(sequence, minlength=num_sequences).clamp(min=1).to(sums)
        return (sums / tokens).sum(), num_sequences
    raise ValueError(f"unknown loss normaliser {normaliser!r}; choose one of {NORMALISERS}")


def reinforce(sequence_logps: Tensor, advantages: Tensor) -> Tensor:
    """(S,) REINFORCE's loss per completion, -A * log pi(completion)."""
    return -advantages.detach() * sequence_logps
