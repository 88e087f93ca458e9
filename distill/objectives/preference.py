"""Offline preference optimisation (DPO, robust/conservative DPO, hinge, IPO, SimPO, ORPO) on pairs.

A batch holds pairs as sequences 2p (chosen) and 2p + 1 (rejected) (``PreferenceDataModule``). The
policy's log-probs are gathered at the response tokens only, chunk by chunk, and summed per sequence
with one ``index_add``; the loss is a pure function of those sums (``distill.losses.preference``).

The reference model, for the losses that need one, runs in ``prepare`` without gradients
(``distill.objectives.reference``: the adapter-disabled policy, a frozen copy, or precomputed).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from distill.data.batch import PairBatch
from distill.losses.preference import PAIR_LOSSES, PairLoss, pair_loss
from distill.objectives.base import Loss, LossInputs, Objective, sequence_log_probs
from distill.objectives.context import Context, Step
from distill.objectives.reference import Reference
from distill.ranges import require

PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class Preference(Objective):
    """``loss`` over each pair's sequence log-probs, plus ``sft_weight`` x the chosen response's NLL."""

    unit = "pair"
    accepts = ("pairs",)

    def __init__(
        self,
        loss: str = "sigmoid",
        beta: float | None = None,
        label_smoothing: float = 0.0,
        gamma: float = 0.5,
        sft_weight: float = 0.0,
        reference: Reference | None = None,
        chunk_size: int = 1024,
    ) -> None:
        """
        Args:
            loss: ``sigmoid`` (DPO), ``robust`` (rDPO), ``hinge`` (SLiC), ``ipo``, ``simpo`` or ``orpo``
                (the last two need no reference model).
            beta: Scale of the implicit reward (DPO family, SimPO); ORPO's lambda. Default: 2.0 for
                ``simpo`` (its paper's range is 2-10), else 0.1.
            label_smoothing: Share of flipped preference labels assumed (conservative DPO, rDPO, SimPO).
            gamma: SimPO's target reward margin.
            sft_weight: Weight of the chosen response's per-token NLL added to the loss (RPO,
                LLaMA-Factory's ``pref_ftx``); ORPO has it built in.
            reference: The reference model (``distill.objectives.Reference``; default: ``auto``).
            chunk_size: Positions whose logits exist at once (forward and backward).
        """
        require("objective.chunk_size", chunk_size, at_least=1)
        require("objective.beta", beta, above=0)
        require("objective.sft_weight", sft_weight, at_least=0)
        if loss not in PAIR_LOSSES:
            raise ValueError(f"unknown Preference loss {loss!r}; choose one of {sorted(PAIR_LOSSES)}")
        if loss == "orpo" and sft_weight:
            raise ValueError("ORPO's loss holds the chosen response's NLL already: leave sft_weight at 0")
        require("objective.label_smoothing", label_smoothing, at_least=0, below=0.5)
        super().__init__()
        self.loss = loss
        self.spec = PAIR_LOSSES[loss]
        beta = beta if beta is not None else (2.0 if loss == "simpo" else 0.1)
        self.options = {"beta": beta, "label_smoothing": label_smoothing, "gamma": gamma}
        self.sft_weight = sft_weight
        self.reference = reference or Reference()
        self.chunk_size = chunk_size

    @property
    def metric_names(self) -> tuple[str, ...]:
        return (*PAIR_METRICS, "nll") if self.sft_weight or self.loss == "orpo" else PAIR_METRICS

    def setup(self, context: Context) -> None:
        if self.spec.reference:
            self.reference.setup(context, "Preference", self.chunk_size)

    @property
    def extra_forwards(self) -> int:
        return int(self.spec.reference and self.reference.kind in ("adapter", "model"))

    @torch.no_grad()
    def prepare(self, batch: PairBatch, step: Step) -> PairBatch:
        if self.spec.reference and batch.reference_logps is None:
            return replace(batch, reference_logps=self.reference.logps(batch))
        return batch

    def forward(self, inputs: LossInputs) -> Loss:
        count = inputs.num_sequences
        sums = sequence_log_probs(inputs, self.chunk_size)  # (S,)
        tokens = torch.bincount(inputs.sequence, minlength=count).clamp(min=1).to(sums)  # (S,)
        scale = tokens if self.spec.length_normalised else torch.ones_like(tokens)
        policy = sums / scale
        reference = {}
        if self.spec.reference:
            ref_sums = inputs.batch.reference_logps.to(sums)  # (S,)
            ref = ref_sums / scale
            reference = {"ref_chosen": ref[0::2], "ref_rejected": ref[1::2]}
        out: PairLoss = pair_loss(self.loss, policy[0::2], policy[1::2], **reference, **self.options)
        loss = out.loss
        nll = -sums[0::2] / tokens[0::2]  # the chosen response's per-token NLL
        if self.sft_weight:
            loss = loss + self.sft_weight * nll
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        if self.spec.reference and self.spec.length_normalised:
            # IPO's loss takes per-token means, but its implicit reward, as every reference loss's, is
            # beta (log pi(y) - log ref(y)) over the sums (TRL's rewards/*): the loss's own are of the means
            rewards = self.options["beta"] * (sums - ref_sums).detach()  # (S,)
            chosen, rejected = rewards[0::2], rewards[1::2]
        metrics = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "logps/chosen": sums[0::2].detach().sum(),
            "logps/rejected": sums[1::2].detach().sum(),
        }
        if "nll" in self.metric_names:
            metrics["nll"] = nll.detach().sum()
        return Loss(loss.sum(), num_units=count // 2, num_tokens=inputs.labels.numel(), sums=metrics)
