"""GRPO (Shao et al. 2024) with the Dr. GRPO and DAPO variants, on the one training path.

``prepare`` samples ``num_generations`` completions of every prompt from the current policy, scores
them and computes group-normalised advantages; the forward is then the student's on those completions,
and the loss per token is the clipped surrogate (+ beta x the k3 KL to the reference), reduced by the
named normaliser (``distill.losses.rl``).

``num_iterations`` > 1 trains on one rollout that many times: the data module repeats each optimizer
step's prompt batches (``PromptDataModule(num_iterations=...)``), the repeats reuse the kept rollout
(``distill.objectives.iterations``), and the ratio to the log-probs it was sampled with is what the
clip bounds. Those log-probs are the first iteration's training forward, detached, and every iteration's
forward draws the same dropout and NEFTune noise (``noise_seed``): the policy is one function of its
weights across the iterations, so the ratio is exactly 1 until the weights change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from distill.data.batch import PromptBatch, RolloutBatch, to_device
from distill.losses.rl import (
    NORMALISERS,
    Normaliser,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    reduce_tokens,
)
from distill.objectives.base import Loss, LossInputs
from distill.objectives.context import Context, Step
from distill.objectives.iterations import KeptRollouts
from distill.objectives.reference import Reference
from distill.objectives.rollouts import RolloutObjective
from distill.ranges import require
from distill.rollout.engine import Sampling, rollout_seed


class GRPO(RolloutObjective):
    own_metrics = ("advantage_sq", "clip_ratio/low", "clip_ratio/high")

    def __init__(
        self,
        rewards: Sequence[Callable],
        num_generations: int = 8,
        sampling: Sampling | None = None,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        num_iterations: int = 1,
        scale_rewards: bool = True,
        loss_normaliser: Normaliser = "dapo",
        reference: Reference | None = None,
        seed: int = 0,
        chunk_size: int = 1024,
    ) -> None:
        """
        Args:
            rewards: Reward functions (``distill.rewards.Accuracy``, ``Format``, ``Length``, ``TokenF1``,
                ``ModelReward``, ``Function`` for any callable), each with its ``weight``.
            num_generations: Completions sampled per prompt (the group G).
            sampling: How completions are drawn (``distill.rollout.Sampling``); log-probs are of its tempered
                distribution.
            beta: Weight of the k3 KL to the reference per token (0: no reference model at all).
            epsilon: Lower clip bound of the ratio (1 - epsilon).
            epsilon_high: Upper clip bound (1 + epsilon_high); DAPO's clip-higher (default: epsilon).
            num_iterations: Updates per rollout (needs the data module's equal ``num_iterations``).
            scale_rewards: Divide advantages by the group's reward std (False: Dr. GRPO).
            loss_normaliser: ``grpo`` (each completion's token mean), ``dr_grpo`` (token sums over
                ``max_new_tokens``) or ``dapo`` (the token mean over the optimizer step).
            reference: The reference (``distill.objectives.Reference``; default: ``auto``); with beta > 0.
            seed: Seed of the sampling (with the epoch and the prompts: a resumed fit samples the same).
            chunk_size: Positions whose logits exist at once (forward and backward).
        """
        if loss_normaliser not in NORMALISERS:
            raise ValueError(f"unknown loss_normaliser {loss_normaliser!r}; choose one of {NORMALISERS}")
        require("objective.num_iterations", num_iterations, at_least=1)
        if beta < 0 or epsilon <= 0 or (epsilon_high is not None and epsilon_high <= 0):
            raise ValueError("beta must be >= 0 and the clip epsilons > 0")
        super().__init__(rewards, num_generations, sampling, beta, reference, seed, chunk_size)
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.num_iterations = num_iterations
        self.scale_rewards = scale_rewards
        self.normaliser = loss_normaliser
        self.unit = "token" if loss_normaliser == "dapo" else "completion"
        self.kept = KeptRollouts()

    def setup(self, context: Context) -> None:
        super().setup(context)
        repeats = context.data.num_iterations
        if repeats != self.num_iterations:
            raise ValueError(
                f"objective.num_iterations is {self.num_iterations} but the data module repeats each "
                f"step's prompts {repeats} time(s): set data.num_iterations: {self.num_iterations}"
            )

    @torch.no_grad()
    def prepare(self, batch: PromptBatch, step: Step) -> RolloutBatch:
        repeated = step.training and self.num_iterations > 1
        key = tuple(batch.shas)
        if repeated:
            window, iteration = batch.window, batch.iteration
            kept = self.kept.take(key, window, iteration, batch.iterations)
            if kept is not None:  # a later iteration of this window's rollout
                return to_device(RolloutBatch(**kept), batch.prompt_ids.device)
        rollout = self.rollouts.sample(batch, step)
        g = self.rollouts.num_generations
        rows = self.rows(batch, rollout, group_advantages(rollout.total, g, scale=self.scale_rewards))
        if repeated and iteration < batch.iterations - 1:  # later iterations train on it again
            rows = replace(rows, noise_seed=rollout_seed(self.rollouts.seed, "noise", window, *key))
            self.kept.keep(key, {k: v for k, v in vars(rows).items() if v is not None})
        return rows

    def forward(self, inputs: LossInputs) -> Loss:
        batch = inputs.batch
        logps, entropy = self.token_log_probs(inputs)
        old = batch.old_logps
        if old is None:  # a rollout's first update: the policy sampled from is this one, ratio 1
            old = logps.detach()
            self.kept.add_old_logps(tuple(batch.prompt_shas), old)  # for its later iterations, if kept
        advantages = batch.advantages.to(logps)
        surrogate = clipped_surrogate(
            logps, old, advantages[inputs.sequence], self.epsilon_low, self.epsilon_high
        )
        per_token = surrogate.loss
        sums = self.rollouts.metric_sums(batch, entropy)
        if self.beta:
            kl = k3_kl(logps, batch.reference_logps.to(logps))
            per_token = per_token + self.beta * kl
            sums["kl"] = kl.detach().sum()
        loss_sum, units = reduce_tokens(
            per_token, inputs.sequence, inputs.num_sequences, self.normaliser, self.sampling.max_new_tokens
        )
        sums["advantage_sq"] = (advantages**2).sum()
        sums["clip_ratio/low"] = surrogate.clipped_low.sum().float()
        sums["clip_ratio/high"] = surrogate.clipped_high.sum().float()
        return Loss(loss_sum, num_units=units, num_tokens=inputs.labels.numel(), sums=sums)

    @property
    def keeps_rank_state(self) -> bool:
        return self.num_iterations > 1

    def rank_state(self) -> dict | None:
        return self.kept.state()

    def load_rank_state(self, state: dict | None) -> None:
        self.kept.load(state)
