"""KD batches: the collator that adds each teacher's targets to a student batch, the training stream
that reads (or, in chunked mode, collects) the cache chunk by chunk, and the validation samples."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, IterableDataset

from distill.cache import CacheReader, CacheSpec
from distill.data.batching import Collator
from distill.data.encoding import IGNORE_INDEX, Encoded
from distill.data.resume import yields
from distill.targets import SparseTargets, concat_targets

if TYPE_CHECKING:
    from distill.data.kd_datamodule import KDDataModule


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
    ) -> dict[str, Any]:
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
        batch.pop("sha", None)
        batch["targets"] = [concat_targets(per_sample) for per_sample in targets]
        batch["vocab_size"] = self.vocab_size
        if teacher_nll is not None:
            batch["teacher_nll"] = {k: torch.tensor(v, dtype=torch.float64) for k, v in teacher_nll.items()}
        return batch


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


class TargetStream(IterableDataset):
    """One epoch of KD batches, chunk by chunk; the same order on every run with the same seed and epoch.

    ``plan(epoch)`` gives the chunks (lists of row indices). Each rank takes every world-th row of a
    chunk, and all ranks stop at the same batch count per chunk (DDP needs equal steps), a count that
    depends on the chunk's size alone. ``skip`` batches are passed over without reading or collecting
    anything (resuming mid-epoch). With workers, worker w produces batches skip + w, skip + w + W, ...
    and opens its own HDF5 handles. A chunk is purged when its batches are done, or when the epoch is
    cut short (``max_steps``, a stop) and the stream is closed.
    """

    def __init__(self, data: KDDataModule, rank: int, world_size: int) -> None:
        self.data = data
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def batches(self, chunk: list[int]) -> list[list[list[Encoded]]]:
        """This rank's batches of one chunk: lists of rows (each row one sample, or several when packing)."""
        rows, size = self.data.train_rows, self.data.batch_size
        steps = math.ceil(len(chunk) // self.world_size / size)  # the smallest rank share's batch count
        mine = [rows[i] for i in chunk[self.rank :: self.world_size]]
        return [mine[b : b + size] for b in range(0, len(mine), size)][:steps]

    def __len__(self) -> int:
        return sum(len(self.batches(chunk)) for chunk in self.data.plan(self.epoch))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        data = self.data
        index = 0
        for chunk in data.plan(self.epoch):
            batches = self.batches(chunk)
            # nothing of this rank's in the chunk, or a chunk trained before the resume: not even collected
            if not batches or index + len(batches) <= self.skip:
                index += len(batches)
                continue
            reader = data.prepare_chunk([s for rows in batches for row in rows for s in row])
            try:
                for rows in batches:
                    if yields(index, self.skip):
                        shas = [s.sha for row in rows for s in row]
                        yield data.kd_collator(rows, *teacher_reads(reader, shas, data.teacher_names))
                    index += 1
            finally:  # also when the loop stops mid-chunk and closes the stream
                data.finish_chunk(reader)


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
