"""The teachers' sparse distributions: what is kept of them (``Sparsity``, the collection options of
``predict`` and ``fit`` alike) and how it is computed from a chunk of logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from distill.ranges import require
from distill.targets import SparseTargets

Scheme = Literal["topk", "sampled", "hybrid"]


@dataclass
class Sparsity:
    """What is kept of each teacher distribution at each position; part of the cache's key."""

    k: int = 64
    """Exact top-k ids kept per position (``topk`` and ``hybrid``)."""
    scheme: Scheme = "topk"
    """``topk`` (exact head + tail mass), ``sampled`` (``num_draws`` tokens drawn from the teacher:
    unbiased) or ``hybrid`` (exact head + draws from the tail)."""
    num_draws: int = 0
    """Draws per position for ``sampled``/``hybrid``."""
    draw_temperature: float = 1.0
    """Temperature of the draws (stored logits are always raw)."""

    def __post_init__(self) -> None:
        require("sparsity.k", self.k, at_least=0)
        require("sparsity.num_draws", self.num_draws, at_least=0)
        require("sparsity.draw_temperature", self.draw_temperature, above=0)
        if self.scheme != "topk" and self.num_draws <= 0:
            raise ValueError(f"sparsity.scheme {self.scheme!r} needs sparsity.num_draws > 0")

    @property
    def head(self) -> int:
        """Top-k ids stored per position: none when every id is drawn."""
        return 0 if self.scheme == "sampled" else self.k


@dataclass
class SparseOutput:
    """One sample's teacher output, on the CPU: what the writer appends to the cache."""

    sha: str
    num_tokens: int
    ids: Tensor  # (P, K) int64, ascending per row
    logits: Tensor  # (P, K) float32 raw logits (temperature 1)
    lse: Tensor  # (P,) float32
    nll: float  # the teacher's -log p of the sample's trained tokens, summed over its P positions
    sample_ids: Tensor | None = None  # (P, S) int64
    sample_counts: Tensor | None = None  # (P, S) int32
    spans: np.ndarray | None = None  # (P, 4) a teacher of another tokenizer's positions in the text

    @property
    def targets(self) -> SparseTargets:
        return SparseTargets(self.ids, self.logits, self.lse, self.sample_ids, self.sample_counts)


LOG2_E = 1.4426950408889634
TOPK_BLOCK = 64  # columns per block of ``top_k``: 500 block maxima and 64 x 64 candidates at V=32000


def top_k(logits: Tensor, k: int, block: int = TOPK_BLOCK) -> tuple[Tensor, Tensor]:
    """``logits.topk(k, dim=-1)`` of (n, V) rows: the k largest values, descending, and their ids.

    On a CPU the k are picked among the elements of the k blocks of ``block`` columns with the
    largest maxima: an element outside them is at most the smallest of those k maxima, so it cannot
    beat the k-th largest element (at best it ties with it). torch.topk copies and heap-sorts each
    whole row; this reads it once (the block maxima) and ranks 1/8 of it: 1.6-2x faster at V=32,000,
    K=64. On a GPU torch.topk's radix select is one kernel already.
    """
    n, vocab = logits.shape
    blocks = vocab // block
    if logits.device.type != "cpu" or not 0 < 4 * k <= blocks:
        return logits.topk(k, dim=-1)
    whole = blocks * block
    grid = logits[:, :whole].view(n, blocks, block)
    chosen = grid.amax(dim=-1).topk(k, dim=-1).indices  # (n, k) blocks holding every top-k element
    rows = torch.arange(n, device=logits.device)[:, None]
    if logits.stride() == (whole, 1):  # one block is one row of a (n * blocks, block) view: row copies
        candidates = grid.view(n * blocks, block).index_select(0, (chosen + rows * blocks).view(-1))
    else:
        candidates = grid[rows, chosen]
    candidates = candidates.view(n, k * block)
    if whole < vocab:  # the partial last block always competes
        candidates = torch.cat([candidates, logits[:, whole:]], dim=1)
    values, slots = candidates.topk(k, dim=-1)
    ids = chosen.gather(1, (slots // block).clamp_(max=k - 1)) * block + slots % block
    if whole < vocab:
        ids = torch.where(slots >= k * block, slots - k * block + whole, ids)
    return values, ids


def sparse_distribution(
    logits: Tensor,
    k: int,
    scheme: Scheme = "topk",
    num_draws: int = 0,
    temperature: float = 1.0,
    scratch: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Top-k ids/logits, the full log-sum-exp, and sampled ids/counts from (n, V) logits.

    Top-k runs on the model's dtype; the log-sum-exp (and the draws) need one float32 (n, V) buffer
    of this chunk only, so no (batch, seq, vocab) float32 tensor exists. ``scratch``: float32
    ``logits`` may serve as that buffer (they are overwritten), which saves an allocation per chunk.
    """
    n = logits.shape[0]
    if scheme == "sampled":
        ids = torch.empty((n, 0), dtype=torch.long, device=logits.device)
        head = torch.empty((n, 0), device=logits.device)
        peak = logits.amax(dim=-1).float()
    else:
        head, ids = top_k(logits, k)  # descending: column 0 is the row's maximum
        peak = head[:, 0].float()
        ids, order = ids.sort(dim=-1)
        head = head.gather(-1, order).float()
    work = logits.float()
    if work.data_ptr() == logits.data_ptr() and not scratch:
        work = work.clone()
    work.sub_(peak[:, None])
    if scheme == "topk":
        # exp(x) = 2 ** (x * log2(e)): torch's exp2 is ~3x faster than its exp on a CPU; the log-sum-exp
        # stays within a float32 ulp of the exact one (the draws below keep exp: the same draws as ever)
        lse = peak + work.mul_(LOG2_E).exp2_().sum(dim=-1).log()
        return ids, head, lse, None, None
    weights = work.exp_()  # exp(logit - max), in place
    lse = peak + weights.sum(dim=-1).log()
    if temperature != 1.0:
        weights.pow_(1.0 / temperature)  # exp((logit - max) / T)
    if scheme == "hybrid":
        weights.scatter_(-1, ids, 0.0)  # draw from the tail only
    draws = torch.multinomial(weights, num_draws, replacement=True)  # unnormalised weights are fine
    counts = torch.zeros_like(weights, dtype=torch.int32).scatter_add_(
        -1, draws, torch.ones_like(draws, dtype=torch.int32)
    )
    sample_counts, sample_ids = counts.topk(min(num_draws, counts.shape[-1]), dim=-1)
    return ids, head, lse, sample_ids, sample_counts
