"""KD batches: the collator that adds each teacher's targets to a student batch, the reads of the cache
it joins, the bounds that plan chunks of targets under a disk budget, and the validation samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch.utils.data import Dataset

from distill.cache.reader import CacheReader
from distill.cache.spec import CacheSpec
from distill.data.batch import TokenBatch
from distill.data.batching import Collator
from distill.data.encoding import IGNORE_INDEX, Encoded
from distill.targets import BatchTargets, SparseTargets, concat_targets


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

    def __call__(
        self,
        rows: list[list[Encoded]],
        targets: list[list[SparseTargets]],
        teacher_nll: dict[str, float] | None = None,
    ) -> TokenBatch:
        """``targets[t][i]``: teacher t's targets of the i-th sample, samples in row order;
        ``teacher_nll``: per teacher name, its NLL of the labels summed over the samples (for the log)."""
        batch = self.collator(rows if self.packing else [row[0] for row in rows])
        samples = [s for row in rows for s in row]
        for per_sample in targets:
            for sample, t in zip(samples, per_sample, strict=True):
                if t.num_positions != trainable_positions(sample):
                    raise ValueError(
                        f"sample {sample.sha}: the cache has {t.num_positions} teacher positions but the "
                        f"data has {trainable_positions(sample)} trainable tokens (rebuild the cache)"
                    )
        nll = {k: torch.tensor(v, dtype=torch.float64) for k, v in (teacher_nll or {}).items()}
        per_teacher = [concat_targets(per_sample) for per_sample in targets]
        return replace(batch, shas=None, targets=BatchTargets(per_teacher, self.vocab_size, nll))


def teacher_reads(
    reader: CacheReader, shas: list[str], teachers: list[str]
) -> tuple[list[list[SparseTargets]], dict[str, float]]:
    """Each teacher's targets of the samples ``shas`` and its NLL of their labels summed over them."""
    targets = [reader.read(shas, name) for name in teachers]
    return targets, {name: float(reader.nll(shas, name).sum()) for name in teachers}


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

    def __init__(self, rows: list, reader: CacheReader, teacher_names: list[str]) -> None:
        self.rows = rows
        self.reader = reader
        self.teacher_names = teacher_names

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[list[Encoded], list[list[SparseTargets]], dict[str, float]]:
        row = self.rows[index] if isinstance(self.rows[index], list) else [self.rows[index]]
        shas = [s.sha for s in row]
        return row, *teacher_reads(self.reader, shas, self.teacher_names)
