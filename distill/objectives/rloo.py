"""RLOO (Ahmadian et al. 2024): REINFORCE on each completion's log-prob with a leave-one-out baseline
over the k completions of its prompt, on the one training path.

``prepare`` samples and scores the completions (``Rollouts``); the forward computes each completion's
log-prob, and, with ``beta`` > 0, subtracts beta x its KL to the reference (the sum of per-token log
ratios) from its reward before the baseline, as the RLOO paper and TRL's ``rloo_trainer`` do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from distill.data.batch import PromptBatch, RolloutBatch
from distill.losses.rl import leave_one_out_advantages, reinforce
from distill.objectives.base import Loss, LossInputs, per_sequence
from distill.objectives.context import Step
from distill.objectives.reference import Reference
from distill.objectives.rollouts import RolloutObjective
from distill.ranges import require
from distill.rollout.engine import Sampling


class RLOO(RolloutObjective):
    unit = "completion"

    def __init__(
        self,
        rewards: Sequence[Callable],
        num_generations: int = 4,
        sampling: Sampling | None = None,
        beta: float = 0.0,
        reference: Reference | None = None,
        seed: int = 0,
        chunk_size: int = 1024,
    ) -> None:
        """
        Args:
            rewards: Reward functions (``distill.rewards.*``), each with its ``weight``.
            num_generations: Completions sampled per prompt (k, at least 2).
            sampling: How completions are drawn (``distill.rollout.Sampling``); log-probs are of its tempered
                distribution.
            beta: KL-in-reward: reward - beta x sum of log(pi / pi_ref) over the completion (0: none,
                and no reference model).
            reference: The reference (``distill.objectives.Reference``; default: ``auto``); with beta > 0.
            seed: Seed of the sampling (with the epoch and the prompts: a resumed fit samples the same).
            chunk_size: Positions whose logits exist at once (forward and backward).
        """
        require("objective.beta", beta, at_least=0)
        super().__init__(rewards, num_generations, sampling, beta, reference, seed, chunk_size)

    @torch.no_grad()
    def prepare(self, batch: PromptBatch, step: Step) -> RolloutBatch:
        rollout = self.rollouts.sample(batch, step)
        return self.rows(batch, rollout, advantages=torch.zeros_like(rollout.total))  # set in forward

    def forward(self, inputs: LossInputs) -> Loss:
        batch, count = inputs.batch, inputs.num_sequences
        logps, entropy = self.token_log_probs(inputs)
        sequence_logps = per_sequence(logps, inputs.sequence, count)
        rewards = batch.reward_total.to(logps)
        sums = self.rollouts.metric_sums(batch, entropy)
        if self.beta:
            log_ratio = logps.detach() - batch.reference_logps.to(logps)
            kl = per_sequence(log_ratio, inputs.sequence, count)
            rewards = rewards - self.beta * kl
            sums["kl"] = kl.sum()
        advantages = leave_one_out_advantages(rewards, self.rollouts.num_generations)
        sums["advantage_sq"] = (advantages**2).sum()
        loss = reinforce(sequence_logps, advantages).sum()
        return Loss(loss, num_units=count, num_tokens=inputs.labels.numel(), sums=sums)

    def derived_metrics(self, values: dict) -> dict:
        out = super().derived_metrics(values)
        if "kl" in out:  # a sum per completion, not per token
            out["kl"] = values["kl"] / values["completions"].clamp(min=1e-12)
        return out
