"""Training objectives: what the student minimises, given its final hidden states where loss is taken.

The student runs its backbone once and hands the objective a ``LossInputs``: the hidden states at the
positions that carry loss (flattened to (N, H)), the labels there, which sequence of the batch each of
those positions belongs to, and each sequence's last non-pad hidden state (where a reward head reads).
The objective returns a ``Loss``: *sums* over its unit (tokens for PT/SFT/KD, pairs for preference
losses). The module divides by the units of the whole optimizer step (all micro-batches, all ranks),
not per micro-batch, so a short and a long micro-batch weigh by what they hold.

An objective is an ``nn.Module``: parameters it owns (a reward head) are trained, checkpointed, sharded
and exported with the student. It says which batches it ``accepts`` (a data module's ``DataFacts``),
checked before ``setup``, which gets the fit's ``Context``. ``prepare`` runs before the forward without
gradients (reference log-probs; rollouts) and returns the batch the forward runs on (``distill.data.batch``:
the loader's with fields filled in, or completion rows of its prompts); its ``noise_seed`` makes the
training forward's dropout and NEFTune noise a function of that seed (GRPO's iterations of one rollout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distill.data.batch import PromptBatch, TokenBatch
from distill.data.encoding import IGNORE_INDEX
from distill.data.facts import BatchKind, DataFacts
from distill.objectives.context import Context, Step


@dataclass
class LossInputs:
    """What an objective reads of one micro-batch's forward."""

    hidden: Tensor  # (N, H) final hidden states at the positions that carry loss
    labels: Tensor  # (N,) the token each of those positions predicts
    sequence: Tensor  # (N,) index of the batch's sequence (sample) each position belongs to
    last_hidden: Tensor  # (S, H) each sequence's last non-pad position
    head: nn.Module  # the output head: (n, H) -> (n, V) logits
    batch: TokenBatch

    @property
    def num_sequences(self) -> int:
        return self.last_hidden.shape[0]


@dataclass
class Loss:
    loss_sum: Tensor  # scalar, differentiable: a sum over ``num_units``
    num_units: int  # what the sums are over (tokens, pairs, sequences): the step normalises by these
    num_tokens: int  # positions the head ran at (FLOPs, throughput)
    correct: Tensor | None = None  # top-1 predictions equal to the label, over the tokens
    sums: dict[str, Tensor] = field(default_factory=dict)  # further per-unit sums, logged as means


def over_chunks(
    fn: Callable[..., tuple[Tensor, ...]],
    hidden: Tensor,
    *per_position: Tensor,
    chunk_size: int = 1024,
    num_outputs: int = 2,
) -> tuple[Tensor, ...]:
    """Sum ``fn(hidden_chunk, *chunks)`` over position chunks, recomputing each chunk in backward.

    Only one chunk's (chunk, vocab) logits exist at a time, in the forward and in the backward pass.
    """
    totals: tuple[Tensor, ...] | None = None
    for start in range(0, hidden.shape[0], chunk_size):
        stop = start + chunk_size
        parts = checkpoint(
            fn, hidden[start:stop], *(t[start:stop] for t in per_position), use_reentrant=False
        )
        totals = parts if totals is None else tuple(a + b for a, b in zip(totals, parts, strict=True))
    if totals is None:  # no position: keep the graph connected so every rank runs backward
        zero = hidden.sum() * 0.0
        return (zero, *[zero.detach()] * (num_outputs - 1))
    return totals


def in_chunks(
    fn: Callable[..., tuple[Tensor, ...]], hidden: Tensor, *per_position: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, ...]:
    """``fn(hidden_chunk, *chunks)``'s per-position outputs concatenated over position chunks, each chunk
    recomputed in backward (as in ``over_chunks``). Without positions one empty chunk runs, so the
    outputs, empty, stay connected to the graph."""
    parts = [
        checkpoint(
            fn,
            hidden[s : s + chunk_size],
            *(t[s : s + chunk_size] for t in per_position),
            use_reentrant=False,
        )
        for s in range(0, max(hidden.shape[0], 1), chunk_size)
    ]
    return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))


def token_log_probs(
    hidden: Tensor, head: nn.Module, labels: Tensor, chunk_size: int = 1024, temperature: float = 1.0
) -> Tensor:
    """(N,) log-probability of each label under the head (its logits divided by ``temperature``, the
    distribution completions were sampled from), computed chunk by chunk (never all N x V logits at
    once, in the forward or the backward pass)."""

    def chunk(h: Tensor, y: Tensor) -> Tensor:
        logits = head(h).float() / temperature  # (n, V)
        return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    parts = [
        checkpoint(chunk, hidden[s : s + chunk_size], labels[s : s + chunk_size], use_reentrant=False)
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(parts) if parts else hidden.sum(-1) * 0.0


def per_sequence(values: Tensor, sequence: Tensor, num_sequences: int) -> Tensor:
    """(S,) sums of per-position ``values`` (N,) by the sequence each position belongs to."""
    return values.new_zeros(num_sequences).index_add(0, sequence, values)


def sequence_log_probs(inputs: LossInputs, chunk_size: int = 1024) -> Tensor:
    """(S,) each sequence's log-prob sum of its labelled tokens."""
    logps = token_log_probs(inputs.hidden, inputs.head, inputs.labels, chunk_size)
    return per_sequence(logps, inputs.sequence, inputs.num_sequences)


def sequence_layout(batch: TokenBatch) -> tuple[Tensor, Tensor]:
    """(B, T) index of the sequence each token belongs to (-1: padding) and (S,) flat index (row * T + t)
    of each sequence's last token.

    Collated batches say it (``sequence_index``: several samples share a packed row, a preference pair
    is two sequences); otherwise each row is one sequence, its padding the positions its
    ``attention_mask`` leaves out.
    """
    ids = batch.input_ids
    index = batch.sequence_index
    if index is None:
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        mask = batch.attention_mask
        index = rows if mask is None else torch.where(mask.bool(), rows, -1)
    flat = index.reshape(-1)
    valid = flat >= 0
    count = int(flat.max()) + 1 if bool(valid.any()) else 0
    positions = torch.arange(flat.numel(), device=ids.device)
    last = torch.zeros(count, dtype=torch.long, device=ids.device)
    last = last.scatter_reduce(0, flat[valid], positions[valid], reduce="amax", include_self=False)
    return index, last


def loss_inputs(hidden: Tensor, head: nn.Module, batch: TokenBatch) -> LossInputs:
    """The loss positions of a forward's final hidden states (B, T, H): position t predicts token t + 1."""
    labels = batch.labels[:, 1:]
    trainable = labels != IGNORE_INDEX
    sequence, last = sequence_layout(batch)
    return LossInputs(
        hidden=hidden[:, :-1][trainable],
        labels=labels[trainable],
        sequence=sequence[:, :-1][trainable],
        last_hidden=hidden.reshape(-1, hidden.shape[-1])[last],
        head=head,
        batch=batch,
    )


DATA_FOR: dict[BatchKind, str] = {
    "samples": "distill.DataModule (distill.KDDataModule for cached teacher targets)",
    "pairs": "distill.PreferenceDataModule with chosen/rejected records",
    "unpaired": "distill.PreferenceDataModule with KTO records ({prompt, completion, label})",
    "prompts": "distill.PromptDataModule",
}


def check_pairing(objective: Objective, data: DataFacts) -> None:
    """Refuse, before any work, a data module whose batches the objective cannot train on (pairs scored
    as unrelated samples, prompts without labels)."""
    if data.batches not in objective.accepts:
        wanted = " or ".join(objective.accepts)
        raise ValueError(
            f"{type(objective).__name__} trains on {wanted} batches, but {data.source} yields "
            f"{data.batches}: use {DATA_FOR[objective.accepts[0]]}"
        )
    if objective.needs_teacher_targets and not data.teacher_names:
        raise ValueError(
            f"{type(objective).__name__} reads cached teacher targets, but {data.source} joins none into "
            "its batches: use distill.KDDataModule, or give the objective online teachers"
        )


class Objective(nn.Module):
    """What the student minimises: ``forward(inputs: LossInputs) -> Loss``.

    ``unit`` names what ``Loss.num_units`` counts; ``metric_names`` the extra sums it reports (logged as
    means per unit on train and val).
    """

    unit: str = "token"
    accepts: tuple[BatchKind, ...] = ("samples",)  # the batches it trains on
    needs_teacher_targets: bool = False  # cached ones, joined into the batches by the data module
    metric_names: tuple[str, ...] = ()
    loss_is_cross_entropy: bool = False  # then its loss per token is logged as a perplexity too
    extra_forwards: int = 0  # forwards without gradients ``prepare`` runs per batch (counted in FLOPs)

    def setup(self, context: Context) -> None:
        """Called once the student is built, its data module set up."""

    @torch.no_grad()
    def prepare(self, batch: TokenBatch | PromptBatch, step: Step) -> TokenBatch:
        """Work before the forward, without gradients: the batch the forward runs on (``batch`` itself, a
        copy with fields filled in, or the rows sampled from its prompts)."""
        return batch

    def forward(self, inputs: LossInputs) -> Loss:
        raise NotImplementedError

    @staticmethod
    def derived_metrics(values: dict[str, Tensor]) -> dict[str, Tensor]:
        """The logged metrics from the means of the reported sums (e.g. a std from a mean square)."""
        return values

    def validated(self, values: dict[str, Tensor]) -> None:
        """Called with the logged metrics of each validation of a fit (not the sanity check)."""

    @property
    def keeps_rank_state(self) -> bool:
        """Whether ``rank_state`` may hold anything (the same on every rank: gathering it is a collective)."""
        return False

    def rank_state(self) -> dict | None:
        """What this rank's objective holds from one optimizer step to the next that a resumed fit needs
        (GRPO's rollouts kept for later iterations): tensors on the CPU, or None. A checkpoint keeps
        every rank's."""
        return None

    def load_rank_state(self, state: dict | None) -> None:
        """This rank's ``rank_state`` at the checkpoint (None: none, or another world size)."""
