"""KTO on unpaired samples, each a completion labelled desirable or not (``PreferenceDataModule`` on
KTO records: one sequence per unit, the label in ``sequence_values`` as 1.0 / 0.0).

The reference point z0 is the policy's KL to the reference estimated on mismatched completions: each
sample's prompt followed by the next sample's completion (TRL's pairing), scored in ``prepare``
without gradients by both models, averaged over the batch and the ranks, then clamped at 0.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from distill.data.batch import TokenBatch, UnpairedBatch, to_device
from distill.data.batching import Collator, pack
from distill.data.encoding import IGNORE_INDEX, Encoded
from distill.data.pair_encoding import first_trainable
from distill.losses.preference import kto, kto_kl_baseline
from distill.objectives.base import Loss, LossInputs, Objective, sequence_log_probs
from distill.objectives.context import Context, Step
from distill.objectives.reference import Reference, sequence_logps
from distill.ranges import require


class KTO(Objective):
    """``w_d (1 - sigmoid(beta (r - z0)))`` for desirable, ``w_u (1 - sigmoid(beta (z0 - r)))`` for
    undesirable samples, ``r`` the log-ratio of policy and reference on the completion."""

    unit = "sample"
    accepts = ("unpaired",)
    extra_forwards = 3  # the reference on the batch; policy and reference on the mismatched completions
    metric_names = ("kl", "rewards/signed", "rewards/accuracies", "logps")

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference: Reference | None = None,
        chunk_size: int = 1024,
    ) -> None:
        """
        Args:
            beta: Scale of the implicit reward.
            desirable_weight: Weight of desirable samples (raise it when they are the fewer: the KTO
                paper keeps ``w_d n_d / (w_u n_u)`` in [1, 4/3]).
            undesirable_weight: Weight of undesirable samples.
            reference: The reference model (``distill.objectives.Reference``; default: ``auto``); not
                ``precomputed``: the mismatched completions change with every batch.
            chunk_size: Positions whose logits exist at once (forward and backward).
        """
        require("objective.chunk_size", chunk_size, at_least=1)
        require("objective.beta", beta, above=0)
        require("objective.desirable_weight", desirable_weight, at_least=0)
        require("objective.undesirable_weight", undesirable_weight, at_least=0)
        reference = reference or Reference()
        if reference.kind == "precomputed":
            raise ValueError(
                "KTO scores mismatched completions that change with each batch: use reference "
                "adapter or model, not precomputed"
            )
        super().__init__()
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.reference = reference
        self.chunk_size = chunk_size

    def setup(self, context: Context) -> None:
        self.reference.setup(context, "KTO", self.chunk_size)
        self.collate = Collator(context.data.pad_id)
        self.context = context

    @torch.no_grad()
    def prepare(self, batch: UnpairedBatch, step: Step) -> UnpairedBatch:
        if batch.reference_logps is None:
            batch = replace(batch, reference_logps=self.reference.logps(batch))
        mismatched = to_device(mismatched_batch(batch, self.collate), batch.input_ids.device)
        policy = sequence_logps(self.context.policy.causal_lm, mismatched, self.chunk_size)
        # one reference point for the step's batches on all ranks; not in validation, where a rank may
        # run one batch fewer than the others and would leave them waiting in the collective
        mean_over_ranks = None
        if step.training and self.context.world_size > 1:
            mean_over_ranks = self.context.mean_over_ranks
        reference = self.reference.logps(mismatched).to(policy)
        return replace(batch, kl_baseline=kto_kl_baseline(policy, reference, mean_over_ranks))

    def forward(self, inputs: LossInputs) -> Loss:
        sums = sequence_log_probs(inputs, self.chunk_size)  # (S,)
        batch = inputs.batch
        desirable = batch.sequence_values.to(sums.device) == 1.0
        reference = batch.reference_logps.to(sums)
        out = kto(
            sums,
            reference,
            desirable,
            batch.kl_baseline,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        signed = torch.where(desirable, 1.0, -1.0) * self.beta * (sums - reference).detach()
        count = inputs.num_sequences
        metrics = {
            "kl": batch.kl_baseline.detach() * count,
            "rewards/signed": signed.sum(),
            "rewards/accuracies": (signed > 0).sum(),
            "logps": sums.detach().sum(),
        }
        return Loss(out.loss.sum(), num_units=count, num_tokens=inputs.labels.numel(), sums=metrics)


def mismatched_batch(batch: TokenBatch, collate: Collator) -> TokenBatch:
    """Each sequence's prompt followed by the next sequence's completion, no longer than the batch's
    longest sequence (prompt tokens cut from the left first), packed (in another order) when the batch is."""
    ids, labels = batch.input_ids.reshape(-1), batch.labels.reshape(-1)
    index = batch.sequence_index.reshape(-1)
    count = int(index.max()) + 1
    if count < 2:
        raise ValueError(
            "KTO needs at least 2 samples per micro-batch to pair prompts with other completions"
        )
    sequences = [Encoded(ids[index == s].tolist(), labels[index == s].tolist(), "", "") for s in range(count)]
    longest = max(len(s.input_ids) for s in sequences)
    mixed = []
    for s, sample in enumerate(sequences):
        other = sequences[(s + 1) % count]
        prompt = sample.input_ids[: first_trainable(sample)]
        start = first_trainable(other)
        completion, completion_labels = other.input_ids[start:], other.labels[start:]
        room = max(longest - len(completion), 1)
        prompt = prompt[-room:]
        tokens = (prompt + completion)[:longest]
        mixed.append(Encoded(tokens, ([IGNORE_INDEX] * len(prompt) + completion_labels)[:longest], "", ""))
    if batch.attention_mask is None:  # a packed batch: pack them alike, into rows as wide as its own
        return collate(list(pack(mixed, batch.input_ids.shape[1])))
    return collate(mixed)
