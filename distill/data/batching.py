"""Samples -> padded batches, or several short samples packed into one row with no cross-attention;
validation batches sharded over ranks without repeating a sample."""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset

from distill.data.batch import TokenBatch
from distill.data.encoding import IGNORE_INDEX, Encoded
from distill.data.resume import yields


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into rows of at most ``capacity`` (a longer item gets a row of its
    own): longest first, each into the row it fills best. O(n log n): rows are kept in buckets by their
    free space, and a sorted list of the non-empty free-space values finds the best row by bisection.
    Ties keep the given order, so the result is a function of the lengths and their order alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free space -> rows with exactly that much free, newest last
    free_values: list[int] = []  # sorted non-empty keys of by_free
    for i in order:
        size = lengths[i]
        at = bisect.bisect_left(free_values, size)
        if at < len(free_values):  # the row whose free space is the smallest that still fits
            free = free_values[at]
            row = by_free[free].pop()
            if not by_free[free]:
                del by_free[free], free_values[at]
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        left = max(free - size, 0)
        if left:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_values, left)
            by_free[left].append(row)
    return rows


def sample_lengths(samples: Sequence[Encoded]) -> list[int]:
    """Token counts; memory-mapped samples (``TokenizedSamples``) give them from their index alone."""
    lengths = getattr(samples, "lengths", None)
    return lengths.tolist() if lengths is not None else [len(s.input_ids) for s in samples]


class PackedRows(Sequence[list[Encoded]]):
    """Rows of samples held as index lists: a row's samples are read only when the row is."""

    def __init__(self, samples: Sequence[Encoded], rows: list[list[int]]) -> None:
        self.samples = samples
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[Encoded]:
        return [self.samples[i] for i in self.rows[index]]


def pack(samples: Sequence[Encoded], max_length: int, seed: int | None = None) -> PackedRows:
    """Rows of samples whose lengths sum to at most ``max_length`` (``best_fit_decreasing`` over the
    samples in an order shuffled from ``seed``, which decides among rows of equal length)."""
    lengths = sample_lengths(samples)
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    rows = best_fit_decreasing([lengths[i] for i in order], max_length)
    return PackedRows(samples, [[order[i] for i in row] for row in rows])


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (padding is masked)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class Collator:
    """Right-pads a list of samples (or packed rows of samples) into tensors.

    Unpacked batches carry a 2-D ``attention_mask``. Packed rows carry ``position_ids`` that restart at
    0 for every sample and no ``attention_mask``: transformers then derives a block-diagonal causal mask
    from the restarts (``masking_utils.find_packed_sequence_indices``), so no token attends across a
    sample boundary, for SDPA and eager attention alike.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Encoded | list[Encoded]]) -> TokenBatch:
        packed = isinstance(items[0], list)
        rows = [item if isinstance(item, list) else [item] for item in items]
        width = max(sum(len(s.input_ids) for s in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        sequence_index = torch.full((len(rows), width), -1, dtype=torch.long)
        sequences = 0
        for r, row in enumerate(rows):
            offset = 0
            for sample in row:
                n = len(sample.input_ids)
                input_ids[r, offset : offset + n] = torch.tensor(sample.input_ids)
                labels[r, offset : offset + n] = torch.tensor(sample.labels)
                # the first token of a sample is never a target: nothing of that sample precedes it
                labels[r, offset] = IGNORE_INDEX
                position_ids[r, offset : offset + n] = torch.arange(n)
                attention_mask[r, offset : offset + n] = 1
                sequence_index[r, offset : offset + n] = sequences
                sequences += 1
                offset += n
            # padding forms its own segment so it never joins the last sample's block
            position_ids[r, offset:] = torch.arange(width - offset)
        return TokenBatch(
            input_ids=input_ids,
            labels=labels,
            position_ids=position_ids,
            sequence_index=sequence_index,
            attention_mask=None if packed else attention_mask,
            shas=None if packed else [row[0].sha for row in rows],
        )


def shard_batches(count: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s evaluation batches of items ``0..count-1``: each item in one batch of one rank.

    The items are cut into ``steps * world_size`` contiguous batches of near-equal size (at most
    ``batch_size``), dealt round-robin, so every rank runs ``steps`` batches (sharded models gather
    weights in each forward, and a rank with one batch fewer would leave the others waiting). Only when
    there are fewer items than batches (``count < steps * world_size``) do some ranks run one batch fewer.
    """
    steps = math.ceil(count / (batch_size * world_size))
    groups = max(steps * world_size, 1)
    bounds = [count * g // groups for g in range(groups + 1)]
    mine = (range(bounds[g], bounds[g + 1]) for g in range(rank, groups, world_size))
    return [list(batch) for batch in mine if batch]


class EvalBatches(IterableDataset):
    """This rank's collated evaluation batches of ``items`` (``shard_batches``).

    An iterable dataset, so Lightning adds no ``DistributedSampler``: that one pads every rank to the same
    count by repeating items, which counts those items twice in the validation sums.
    """

    def __init__(
        self,
        items: Sequence[Any],
        collate: Callable[[list[Any]], Any],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.items = items
        self.collate = collate
        self.batches = shard_batches(len(items), batch_size, rank, world_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.batches):
            if yields(index, 0):
                yield self.collate([self.items[i] for i in batch])
