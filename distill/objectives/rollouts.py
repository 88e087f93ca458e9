"""What GRPO and RLOO share: sampling a group of completions per prompt, scoring them, the training batch
they become, the reference's log-probs of it, and the metrics of a rollout (``RolloutObjective``).

``Rollouts.sample`` runs in the objective's ``prepare`` (no gradients): the prompt batch of a
``PromptDataModule`` -> ``num_generations`` completions per prompt from the current policy (an
``Engine``) -> rewards (``distill.rewards``) -> rows of prompt + completion whose labels are the
completion's tokens. Each call is seeded from (seed, epoch, the batch's prompts), so a fit resumed from a
checkpoint draws the same completions it would have drawn (from the same weights); validation is seeded
by the prompts alone, so every evaluation samples with the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distill.data.batch import PromptBatch, RolloutBatch, TokenBatch, extended
from distill.objectives.base import LossInputs, Objective
from distill.objectives.context import Context, Step
from distill.objectives.reference import Reference
from distill.ranges import require
from distill.rewards import names, score, weights
from distill.rollout.completions import Completions, rollout_batch
from distill.rollout.engine import Engine, Sampler, Sampling, TransformersEngine, rollout_seed


@dataclass
class Rollout:
    rows: TokenBatch  # the rows the student trains on (``rollout_batch``)
    completions: Completions
    rewards: Tensor  # (S, F) each reward function's unweighted reward
    total: Tensor  # (S,) the weighted sum: what advantages are computed from
    prompts: list[str]  # (S,) each completion's prompt text
    texts: list[str]  # (S,) the decoded completions


def sampling_seed(seed: int, step: Step, shas: Sequence[str]) -> int:
    """The seed of a batch's sampling: keyed by its prompts, not the batch index, so a repeat of the step
    (num_iterations) or a resumed fit draws the same noise for the same prompts; validation by the
    prompts alone, so every evaluation samples with the same noise."""
    if step.training:
        return rollout_seed(seed, "train", step.epoch, *shas)
    return rollout_seed(seed, "eval", *shas)


class Rollouts:
    def __init__(
        self,
        rewards: Sequence[Callable],
        num_generations: int,
        sampling: Sampling,
        seed: int = 0,
        engine: Engine | None = None,
    ) -> None:
        if not rewards:
            raise ValueError("give at least one reward function (objective.rewards)")
        if num_generations < 2:
            raise ValueError("num_generations must be at least 2: advantages compare a prompt's completions")
        self.functions = list(rewards)
        self.names = names(self.functions)
        self.weights = weights(self.functions)
        self.num_generations = num_generations
        self.sampling = sampling
        self.seed = seed
        self.engine = engine or TransformersEngine()
        self.last: Rollout | None = None  # the latest training rollout, for the completion log

    def setup(self, context: Context) -> None:
        """What sampling needs to know: the tokenizer, what generation stops on, the policy."""
        self.tokenizer = context.tokenizer
        data = context.data
        self.sampler = Sampler(self.engine, self.sampling, list(data.stop_ids), data.pad_id, context.sharded)
        self.policy = context.policy

    def sample(self, batch: PromptBatch, step: Step) -> Rollout:
        """``roll`` of the current policy, seeded for this step; the training ones kept for the log."""
        rollout = self.roll(self.policy.model, batch, sampling_seed(self.seed, step, batch.shas))
        if step.training:
            self.last = rollout
        return rollout

    @torch.no_grad()
    def roll(self, model: nn.Module, batch: PromptBatch, seed: int) -> Rollout:
        """The prompts of ``batch`` -> ``num_generations`` completions each -> their rewards and rows."""
        completions = self.sampler(model, batch.prompt_ids, batch.prompt_mask, self.num_generations, seed)
        texts = self.tokenizer.batch_decode(completions.ids, skip_special_tokens=True)  # pads after stops
        g = self.num_generations
        repeat = lambda values: [v for v in values for _ in range(g)]  # noqa: E731
        prompts = repeat(batch.prompts)
        fields = {key: repeat(values) for key, values in batch.fields.items()}
        fields["messages"] = repeat(batch.messages)
        fields["completion_length"] = completions.lengths.tolist()
        fields["stopped"] = completions.stopped.tolist()
        device = completions.ids.device
        rewards = score(self.functions, prompts, texts, fields, repeat(batch.sources)).to(device)
        return Rollout(
            rows=rollout_batch(batch.prompt_ids, batch.prompt_mask, completions),
            completions=completions,
            rewards=rewards,
            total=rewards @ self.weights.to(device),
            prompts=prompts,
            texts=texts,
        )

    @property
    def metric_names(self) -> tuple[str, ...]:
        return (
            "completions",
            "reward",
            "reward_sq",
            *(f"rewards/{name}" for name in self.names),
            "completion_tokens",
            "completions/stopped",
            "entropy",
        )

    def metric_sums(self, batch: RolloutBatch, entropy: Tensor) -> dict[str, Tensor]:
        """Sums over this micro-batch's completions (and tokens, for entropy)."""
        total, rewards = batch.reward_total, batch.rewards
        sums = {
            "completions": torch.tensor(float(total.numel()), device=total.device),
            "reward": total.sum(),
            "reward_sq": (total**2).sum(),
            "completion_tokens": batch.completion_lengths.sum().float(),
            "completions/stopped": batch.stopped.sum().float(),
            "entropy": entropy.sum(),
        }
        sums.update({f"rewards/{name}": rewards[:, i].sum() for i, name in enumerate(self.names)})
        return sums


def rollout_metrics(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-completion and per-token means from the per-unit means of the sums (ratios of sums)."""
    out = dict(values)
    completions = out.pop("completions").clamp(min=1e-12)
    tokens = out.pop("completion_tokens").clamp(min=1e-12)
    reward = out["reward"] / completions
    out["reward"] = reward
    out["reward_std"] = (out.pop("reward_sq") / completions - reward**2).clamp(min=0).sqrt()
    for key in [k for k in out if k.startswith("rewards/")]:
        out[key] = out[key] / completions
    out["completions/mean_length"] = tokens / completions
    out["completions/stopped"] = out["completions/stopped"] / completions
    out["completions/truncated"] = 1.0 - out["completions/stopped"]
    for key in ("entropy", "kl", "clip_ratio/low", "clip_ratio/high"):
        if key in out:
            out[key] = out[key] / tokens
    if "advantage_sq" in out:
        out["advantage_std"] = (out.pop("advantage_sq") / completions).sqrt()
    return out


def rollout_rows(prompts: PromptBatch, rollout: Rollout, advantages: Tensor) -> RolloutBatch:
    """What the forward runs on after ``prepare``: the rollout's rows of ``prompts``, its completions'
    values beside them."""
    return extended(
        rollout.rows,
        RolloutBatch,
        prompt_shas=prompts.shas,
        rewards=rollout.rewards,
        reward_total=rollout.total,
        advantages=advantages,
        completion_lengths=rollout.completions.lengths,
        stopped=rollout.completions.stopped,
    )


def token_log_probs_and_entropy(
    hidden: Tensor, head: nn.Module, labels: Tensor, chunk_size: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """(N,) log-prob of each label and (N,) detached entropy of the sampling distribution, chunk by
    chunk (one chunk's logits at a time, recomputed in backward)."""

    def chunk(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = head(h).float() / temperature
        log_z = torch.logsumexp(logits, dim=-1)
        entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
        return logits.gather(1, y[:, None]).squeeze(1) - log_z, entropy.detach()

    parts = [
        checkpoint(chunk, hidden[s : s + chunk_size], labels[s : s + chunk_size], use_reentrant=False)
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    if not parts:
        zero = hidden.sum(-1) * 0.0
        return zero, zero.detach()
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class RolloutObjective(Objective):
    """An objective that samples and scores completions of its prompts in ``prepare`` (GRPO, RLOO), with
    ``beta`` > 0 beside them the reference's log-probs of every completion token. Its options are
    documented by the objectives' own signatures."""

    accepts = ("prompts",)
    own_metrics: tuple[str, ...] = ("advantage_sq",)  # reported beside the rollout's, before ``kl``

    def __init__(
        self,
        rewards: Sequence[Callable],
        num_generations: int,
        sampling: Sampling | None,
        beta: float,
        reference: Reference | None,
        seed: int,
        chunk_size: int,
    ) -> None:
        require("objective.chunk_size", chunk_size, at_least=1)
        super().__init__()
        self.sampling = sampling or Sampling()
        self.rollouts = Rollouts(rewards, num_generations, self.sampling, seed)
        self.beta = beta
        self.reference = reference or Reference()
        self.chunk_size = chunk_size

    @property
    def metric_names(self) -> tuple[str, ...]:
        names = (*self.rollouts.metric_names, *self.own_metrics)
        return (*names, "kl") if self.beta else names

    @property
    def extra_forwards(self) -> int:
        return int(self.beta > 0)

    def setup(self, context: Context) -> None:
        self.rollouts.setup(context)
        if self.beta:
            name = type(self).__name__
            self.reference.setup(context, name, self.chunk_size)
            if self.reference.kind == "precomputed":
                raise ValueError(
                    f"{name} samples its completions as it trains: the reference cannot be precomputed"
                )

    def rows(self, prompts: PromptBatch, rollout: Rollout, advantages: Tensor) -> RolloutBatch:
        """``rollout_rows``, with the reference's token log-probs when ``beta`` > 0."""
        rows = rollout_rows(prompts, rollout, advantages)
        if self.beta:
            rows = replace(rows, reference_logps=self.reference.token_logps(rows, self.sampling.temperature))
        return rows

    def token_log_probs(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        """``token_log_probs_and_entropy`` of the sampling distribution at the completion tokens."""
        return token_log_probs_and_entropy(
            inputs.hidden, inputs.head, inputs.labels, self.chunk_size, self.sampling.temperature
        )

    def derived_metrics(self, values: dict) -> dict:
        return rollout_metrics(values)
