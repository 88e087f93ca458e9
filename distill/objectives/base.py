"""Training objectives: what the student minimises, given its final hidden states at trainable positions.

An objective sees only the positions that carry loss (``hidden`` and ``labels`` of shape (N, H) and
(N,)) and the output head, and returns token *sums*: the module divides by the number of trainable
tokens of the whole optimizer step (all micro-batches, all ranks), not per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class TokenLoss:
    loss_sum: Tensor  # scalar, differentiable
    num_tokens: int
    correct: Tensor  # scalar: argmax predictions equal to the label
    sums: dict[str, Tensor] = field(default_factory=dict)  # further per-token sums to log as means


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


class Objective:
    """What the student minimises: ``__call__(hidden, head, labels, batch) -> TokenLoss``.

    ``metric_names`` lists the extra per-token sums it reports (logged as means on train and val).
    """

    metric_names: tuple[str, ...] = ()

    def setup(self, student: nn.Module) -> None:
        """Called once the student is built (e.g. to learn its tokenizer)."""

    def __call__(self, hidden: Tensor, head: nn.Module, labels: Tensor, batch: dict) -> TokenLoss:
        raise NotImplementedError
