"""GRPO / RLOO losses against naive per-element references written here."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses.rl import (
    clipped_surrogate,
    group_advantages,
    k3_kl,
    leave_one_out_advantages,
    reduce_tokens,
    reinforce,
)


def naive_group_advantages(rewards: list[float], group: int, scale: bool) -> list[float]:
    out = []
    for start in range(0, len(rewards), group):
        values = rewards[start : start + group]
        mean = sum(values) / group
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (group - 1))
        out += [(v - mean) / (std + 1e-4) if scale else v - mean for v in values]
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_the_per_group_formula(scale):
    rewards = [1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 1.0]
    got = group_advantages(torch.tensor(rewards), 4, scale=scale)
    torch.testing.assert_close(got, torch.tensor(naive_group_advantages(rewards, 4, scale)))
    assert torch.all(got[4:8] == 0)  # a group whose rewards are equal teaches nothing


def test_advantages_refuse_partial_groups():
    with pytest.raises(ValueError, match="whole groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_leave_one_out_baseline_is_the_mean_of_the_others():
    rewards = [1.0, 0.0, 0.0, 1.0, 3.0, 2.0]
    expected = []
    for start in range(0, 6, 3):
        group = rewards[start : start + 3]
        expected += [r - (sum(group) - r) / 2 for r in group]
    got = leave_one_out_advantages(torch.tensor(rewards), 3)
    torch.testing.assert_close(got, torch.tensor(expected))
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(torch.zeros(3), 1)


def test_k3_kl_is_the_estimator_and_is_unbiased_for_kl():
    logps, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, -0.1])
    expected = [math.exp(r - lp) - (r - lp) - 1 for lp, r in zip(logps.tolist(), ref.tolist(), strict=True)]
    torch.testing.assert_close(k3_kl(logps, ref), torch.tensor(expected))
    assert k3_kl(logps, logps).abs().max() == 0
    # sampled from the policy, the estimator's mean is KL(policy || reference)
    generator = torch.Generator().manual_seed(0)
    policy, reference = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    draws = torch.multinomial(policy, 200_000, replacement=True, generator=generator)
    estimate = k3_kl(policy.log()[draws], reference.log()[draws]).mean()
    exact = (policy * (policy / reference).log()).sum()
    assert abs(float(estimate) - float(exact)) < 0.01


def test_clipped_surrogate_matches_ppo_and_clips_only_where_defined():
    old = torch.zeros(6)
    ratios = torch.tensor([0.5, 0.5, 1.0, 1.5, 1.5, 1.1])
    advantages = torch.tensor([1.0, -1.0, 2.0, 1.0, -1.0, 1.0])
    logps = ratios.log().requires_grad_(True)
    out = clipped_surrogate(logps, old, advantages, epsilon_low=0.2, epsilon_high=0.28)
    expected = []
    for r, a in zip(ratios.tolist(), advantages.tolist(), strict=True):
        expected.append(-min(r * a, min(max(r, 0.8), 1.28) * a))
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    assert out.clipped_low.tolist() == [False, True, False, False, False, False]
    assert out.clipped_high.tolist() == [False, False, False, True, False, False]
    out.loss.sum().backward()
    # clipped tokens get no gradient; the others get -A * ratio (d ratio / d logp = ratio)
    torch.testing.assert_close(logps.grad, torch.tensor([-0.5, 0.0, -2.0, 0.0, 1.5, -1.1]))


def test_normalisers_reduce_as_named():
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    sequence = torch.tensor([0, 0, 0, 1, 2])
    total, units = reduce_tokens(per_token, sequence, 4, "grpo", 8)
    assert units == 4 and float(total) == pytest.approx(2.0 + 4.0 + 10.0 + 0.0)  # empty completion: 0
    total, units = reduce_tokens(per_token, sequence, 4, "dr_grpo", 8)
    assert units == 4 and float(total) == pytest.approx(20.0 / 8)
    total, units = reduce_tokens(per_token, sequence, 4, "dapo", 8)
    assert units == 5 and float(total) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="unknown loss normaliser"):
        reduce_tokens(per_token, sequence, 4, "mean", 8)


def test_reinforce_weights_the_sequence_log_prob_by_the_detached_advantage():
    logps = torch.tensor([-3.0, -1.0], requires_grad=True)
    advantages = torch.tensor([0.5, -2.0], requires_grad=True)
    loss = reinforce(logps, advantages)
    torch.testing.assert_close(loss, torch.tensor([1.5, -2.0]))
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([-0.5, 2.0]))
    assert advantages.grad is None
