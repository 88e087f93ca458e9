"""KD batches: the collator that adds each teacher's targets to a student batch, the reads of the cache
it joins, the bounds that plan chunks of targets under a disk budget, and the validation samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from distill.cache.reader import CacheReader
from distill.cache.spec import CacheSpec
from distill.data.batch import TokenBatch
from distill.data.batching import Collator
from distill.data.encoding import IGNORE_INDEX, Encoded
from distill.targets import BatchTargets, SparseTargets, concat_targets
from distill.teacher.join import CrossJoin


def trainable_positions(sample: Encoded) -> int:
    """Positions that carry loss, hence targets: t predicts t + 1; a sample's first token is no target."""
    return sum(label != IGNORE_INDEX for label in sample.labels[1:])


def bytes_per_position_bound(spec: CacheSpec) -> float:
    """A safe upper bound of the encoded size of one position (plans chunks before anything is stored).

    Rice-coded id gaps need about log2(V / K) + 2 bits, values ``value_bits`` + 2; lse and tail take 6
    bytes. A 1.5x margin covers the coder's worst cases and the HDF5 overhead of small segments.
    """
    per_position = 8.0
    if spec.k:
        per_position += spec.k * (math.log2(spec.vocab_size / spec.k) + 4 + spec.value_bits) / 8
    if spec.n_draws:
        per_position += spec.n_draws * (math.log2(spec.vocab_size) + 8) / 8
    return 1.5 * per_position


SEGMENT_BYTES = 16e3
"""A bound of the bytes of one segment beyond its positions (HDF5 object headers of its datasets, about
10 kB): a cache directory holds at least one, which only a tiny ``cache_size_gb`` notices."""


def estimated_bytes(samples: Sequence[Encoded], spec: CacheSpec) -> float:
    """A bound of the encoded size of the samples' targets."""
    return sum(map(trainable_positions, samples)) * bytes_per_position_bound(spec)


def split_bytes(samples: Sequence[Encoded], spec: CacheSpec) -> float:
    """A bound of the disk a cache directory of ``samples`` takes."""
    return estimated_bytes(samples, spec) + SEGMENT_BYTES if samples else 0.0


@dataclass
class KDCollator:
    """Rows of samples -> the student batch plus each teacher's targets at its trainable positions."""

    collator: Collator
    packing: bool
    vocab_size: int
    joins: list[CrossJoin] | None = None  # per teacher, in a cache in the teachers' own terms

    def __call__(
        self,
        rows: list[list[Encoded]],
        targets: list[list[SparseTargets]],
        teacher_nll: dict[str, float] | None = None,
        spans: list[list[np.ndarray]] | None = None,
    ) -> TokenBatch:
        """``targets[t][i]``: teacher t's targets of the i-th sample, samples in row order;
        ``teacher_nll``: per teacher name, its NLL of the labels summed over the samples (for the log);
        ``spans[t][i]``: where teacher t's positions of sample i lie in the text (``joins`` set)."""
        batch = self.collator(rows if self.packing else [row[0] for row in rows])
        samples = [s for row in rows for s in row]
        nll = {k: torch.tensor(v, dtype=torch.float64) for k, v in (teacher_nll or {}).items()}
        if self.joins is not None:  # teachers of another tokenizer: their rows become the student's
            joined = [join(samples, t, p) for join, t, p in zip(self.joins, targets, spans, strict=True)]
            aligned = torch.stack([j.aligned for j in joined]).all(0)
            mass = torch.stack([j.mapped_mass for j in joined]).mean(0).masked_fill(~aligned, 0.0)
            found = BatchTargets([j.targets for j in joined], self.vocab_size, nll, aligned, mass)
            return replace(batch, shas=None, targets=found)
        for per_sample in targets:
            for sample, t in zip(samples, per_sample, strict=True):
                if t.num_positions != trainable_positions(sample):
                    raise ValueError(
                        f"sample {sample.sha}: the cache has {t.num_positions} teacher positions but the "
                        f"data has {trainable_positions(sample)} trainable tokens (rebuild the cache)"
                    )
        per_teacher = [concat_targets(per_sample) for per_sample in targets]
        return replace(batch, shas=None, targets=BatchTargets(per_teacher, self.vocab_size, nll))


def teacher_reads(
    reader: CacheReader, shas: list[str], teachers: list[str], spans: bool = False
) -> tuple[list[list[SparseTargets]], dict[str, float], list[list[np.ndarray]] | None]:
    """Each teacher's targets of the samples ``shas``, its NLL of their labels summed over them, and
    (``spans``: a cache in the teachers' own terms) where its positions lie in the text."""
    targets = [reader.read(shas, name) for name in teachers]
    places = [reader.spans(shas, name) for name in teachers] if spans else None
    return targets, {name: float(reader.nll(shas, name).sum()) for name in teachers}, places


def fill_chunks(order: Sequence[int], sizes: Sequence[float], limit: float) -> list[list[int]]:
    """``order`` cut into consecutive chunks whose ``sizes`` sum to at most ``limit`` (an item larger than
    that is a chunk of its own)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    held = 0.0
    for index in order:
        if current and held + sizes[index] > limit:
            chunks.append(current)
            current, held = [], 0.0
        current.append(index)
        held += sizes[index]
    return chunks + ([current] if current else [])


class TargetedSamples(Dataset):
    """Map-style (sample rows, targets, teacher NLL sums) for validation; the reader reopens its files in
    each worker."""

    def __init__(
        self, rows: list, reader: CacheReader, teacher_names: list[str], spans: bool = False
    ) -> None:
        self.rows = rows
        self.reader = reader
        self.teacher_names = teacher_names
        self.spans = spans

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple:
        """(row, targets per teacher, NLL per teacher, spans per teacher or None)."""
        row = self.rows[index] if isinstance(self.rows[index], list) else [self.rows[index]]
        shas = [s.sha for s in row]
        return row, *teacher_reads(self.reader, shas, self.teacher_names, self.spans)
