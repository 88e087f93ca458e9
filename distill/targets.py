"""The sparse teacher distribution at a set of positions: what the cache stores and the KD losses read."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class SparseTargets:
    """Teacher distribution at P positions, in one of three schemes.

    - top-k: ``ids``/``logits`` hold the exact head; ``lse`` makes the tail mass recoverable as
      ``log1p(-exp(logsumexp(logits) - lse))``.
    - sampled: K == 0; ``sample_ids``/``sample_counts`` hold N draws from the teacher (unbiased).
    - hybrid: an exact head plus draws from the tail only.
    """

    ids: Tensor  # (P, K) int64 token ids of the exact head, sorted ascending; K may be 0
    logits: Tensor  # (P, K) float32 raw teacher logits at ``ids`` (temperature 1)
    lse: Tensor  # (P,) float32 log-sum-exp of all of the teacher's logits (temperature 1)
    sample_ids: Tensor | None = None  # (P, S) int64 sampled ids, padded with 0
    sample_counts: Tensor | None = None  # (P, S) int32 draw counts, 0 on padding

    @property
    def num_positions(self) -> int:
        return self.lse.shape[0]

    def to(self, device: torch.device | str) -> SparseTargets:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return SparseTargets(**{k: v.to(device) if v is not None else None for k, v in moved.items()})
