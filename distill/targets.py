"""The sparse teacher distribution at a set of positions: what the cache stores and the KD losses read."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
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
    nll: Tensor | None = None  # (P,) float32 teacher -log p(the token each position predicts), temperature 1;
    # known where the teacher ran on the labels (collection, online KD), not in cache reads

    @property
    def num_positions(self) -> int:
        return self.lse.shape[0]

    def to(self, device: torch.device | str) -> SparseTargets:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return SparseTargets(**{k: v.to(device) if v is not None else None for k, v in moved.items()})


@dataclass
class BatchTargets:
    """Each teacher's targets at a batch's trainable positions (in row order), as the KD collator joins
    cached ones and online teachers make them."""

    per_teacher: list[SparseTargets]
    vocab_size: int
    nll: dict[str, Tensor] = field(default_factory=dict)  # per teacher: its NLL of the labels, summed
    # teachers of another tokenizer (KD across tokenizers): (P,) bool, a teacher distribution aligned with
    # the position (else it trains on the hard label alone), and (P,) the teacher mass mapped there
    aligned: Tensor | None = None
    mapped_mass: Tensor | None = None


def teacher_top1(targets: SparseTargets) -> Tensor:
    """The teacher's most likely token per position (the most drawn one in sampled mode)."""
    if targets.ids.shape[-1] > 0:
        return targets.ids.gather(-1, targets.logits.argmax(-1, keepdim=True)).squeeze(-1)
    return targets.sample_ids.gather(-1, targets.sample_counts.argmax(-1, keepdim=True)).squeeze(-1)


def concat_targets(parts: list[SparseTargets]) -> SparseTargets:
    """Samples' targets one after another, in the order of the batch's trainable positions.

    Sampled columns may differ in width between samples (the reader trims unused slots): narrower
    ones are padded with count 0, which carries no weight."""
    if len(parts) == 1:
        return parts[0]
    sampled = parts[0].sample_ids is not None
    width = max(p.sample_ids.shape[-1] for p in parts) if sampled else 0

    def padded(name: str) -> Tensor | None:
        if not sampled:
            return None
        return torch.cat([F.pad(getattr(p, name), (0, width - p.sample_ids.shape[-1])) for p in parts])

    return SparseTargets(
        ids=torch.cat([p.ids for p in parts]),
        logits=torch.cat([p.logits for p in parts]),
        lse=torch.cat([p.lse for p in parts]),
        sample_ids=padded("sample_ids"),
        sample_counts=padded("sample_counts"),
        nll=torch.cat([p.nll for p in parts]) if all(p.nll is not None for p in parts) else None,
    )
