"""Collector: what a distillation fit collects from its teachers and when, driven from one place.

Before training, ``before_fit`` (``KDDataModule.setup`` calls it on every rank) decides from the disk
budget whether the training targets are collected whole or chunk by chunk, then collects what the caches
lack, the ranks meeting at two barriers: rank 0 syncs the caches holding their writer locks,
``kd-cache-sync``; every rank collects its shard, ``kd-cache-collected`` (``TeacherTargets
.sync_and_collect``). During training, the stream (``stream``) collects a chunk when its first batch is
due (chunked mode: the teachers loaded, then freed) and purges it when its batches are done, so the disk
never holds more than the budget; with on-policy rounds each chunk is a round the student samples
(``distill.rollout.rounds``), streamed by the data module.

Lightning reads an epoch's length once, before the first epoch, so every epoch must yield exactly that
many batches: the rows (packed once) and the chunks are the same in every epoch; only their order
changes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import cached_property

from lightning.pytorch.utilities import rank_zero_info

from distill.cache.spec import CacheSpec
from distill.data.encoding import Encoded
from distill.data.resume import epoch_rng
from distill.teacher.batches import (
    SEGMENT_BYTES,
    bytes_per_position_bound,
    estimated_bytes,
    fill_chunks,
    split_bytes,
)
from distill.teacher.targets import Collection, TargetStream, TeacherTargets


class Collector:
    """Collect-before-train and the chunks of a KD fit's training rows, for ``targets``
    (``cache_size_gb``, ``chunk_samples``, ``seed``: ``KDDataModule``'s options)."""

    def __init__(
        self, targets: TeacherTargets, cache_size_gb: float | None, chunk_samples: int, seed: int
    ) -> None:
        self.targets = targets
        self.cache_size_gb = cache_size_gb
        self.chunk_samples = chunk_samples
        self.seed = seed
        self.spec: CacheSpec | None = None
        self.rows: list[list[Encoded]] = []
        self.val: Sequence[Encoded] = []
        self.chunked = False

    def before_fit(
        self,
        spec: CacheSpec,
        collection: Collection,
        train: Sequence[Encoded],
        rows: list[list[Encoded]],
        val: Sequence[Encoded],
        *,
        round_positions: int | None,
        packing: bool,
        tokens: str,
    ) -> dict[str, float]:
        """Collect what the caches of ``val`` and ``train`` lack (``rows``: the training samples in rows,
        one each or packed); with on-policy rounds (``round_positions``: the positions of one rank's
        round) or over the budget only ``val``'s, the training targets come chunk by chunk. Returns the
        teachers' perplexities on the ``tokens`` tokens (rank 0; empty on the others)."""
        self.spec, self.rows, self.val = spec, rows, val
        total = split_bytes(train, spec) + split_bytes(val, spec)
        rounds = round_positions is not None
        over_budget = not rounds and self.cache_size_gb is not None and total > self.cache_size_gb * 1e9
        self.chunked = rounds or over_budget
        # the budget is checked on estimates: a budget too small is refused before any teacher runs
        if over_budget:
            largest = max(estimated_bytes(row, spec) for row in rows)
            self.check_fits(largest, "one training sample (or packed row)", "data.max_seq_length")
        if rounds:
            needs = round_positions * bytes_per_position_bound(spec)
            self.check_fits(needs, "a round's targets", "data.rounds.prompts_per_round")
        self.targets.start(spec, collection, chunked=self.chunked, packing=packing)
        full = [("val", val)] + ([] if self.chunked else [("train", train)])
        full = [(split, samples) for split, samples in full if samples]
        collected = self.targets.sync_and_collect(full)  # the barriers
        rank_zero_info(f"[distill] collected {collected} samples on rank 0 before training")
        found = self.targets.perplexities(dict(full), tokens) if collection.rank == 0 and full else {}
        if collection.rank == 0 and full:  # teachers of another tokenizer: what aligning them keeps
            found.update(self.targets.alignment(*full[0]))
        if over_budget:
            rank_zero_info(
                f"[distill] chunked KD: ~{total / 1e9:.3g} GB of targets > cache_size_gb "
                f"{self.cache_size_gb}; {len(self.plan(0))} chunks per epoch"
            )
        if self.chunked:
            self.targets.open_chunks()
        return found

    def check_fits(self, needs: float, what: str, option: str) -> None:
        """Refuse a budget whose chunks cannot hold ``what`` (``needs`` bytes); ``option`` is the other
        way out than a larger budget."""
        if self.cache_size_gb is not None and self.chunk_budget < needs:
            least = self.cache_size_gb - (self.chunk_budget - needs) / 1e9
            scale = 10 ** (math.floor(math.log10(least)) - 2)
            least = math.ceil(least / scale) * scale  # three digits, rounded up: that budget is enough
            raise ValueError(
                f"data.cache_size_gb={self.cache_size_gb} leaves {self.chunk_budget / 1e9:.3g} GB for "
                f"training targets beside the validation set's, less than {what} may take "
                f"({needs / 1e9:.3g} GB): raise data.cache_size_gb to at least {least:.3g}, or lower {option}"
            )

    @property
    def chunk_budget(self) -> float:
        """Bytes of positions a chunk may hold: the budget less the validation cache and one segment."""
        return self.cache_size_gb * 1e9 - split_bytes(self.val, self.spec) - SEGMENT_BYTES

    @cached_property
    def chunks(self) -> list[list[int]]:
        """The training rows' fixed partition into chunks; each epoch streams them in an order of its own.

        Fixed, so that every epoch yields the same number of batches. Without a budget: consecutive rows
        of up to ``chunk_samples`` samples (neighbours in the cache). In chunked mode: rows drawn in an
        order shuffled from the seed, as many per chunk as fit the disk budget.
        """
        if not self.chunked:
            return fill_chunks(range(len(self.rows)), [len(row) for row in self.rows], self.chunk_samples)
        order = list(range(len(self.rows)))
        random.Random(self.seed).shuffle(order)
        return fill_chunks(order, [estimated_bytes(row, self.spec) for row in self.rows], self.chunk_budget)

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's chunks of training-row indices: their order and the order within each shuffled
        from (seed, epoch)."""
        rng = epoch_rng(self.seed, epoch)
        chunks = [list(chunk) for chunk in self.chunks]
        rng.shuffle(chunks)
        for chunk in chunks:
            rng.shuffle(chunk)
        return chunks

    def stream(self, batch_size: int, rank: int, world_size: int) -> TargetStream:
        """One epoch of the training rows' KD batches, chunk by chunk."""
        return TargetStream(self.targets, self.rows, batch_size, self.plan, rank, world_size)
