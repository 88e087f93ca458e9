"""Teacher targets composed into a data module: the caches of the teachers' sparse distributions of its
samples, synced and completed before training, then joined to the student's batches.

``TeacherTargets`` owns the ``TeacherModule``, the caches under ``cache_dir`` and their locks;
``distill.teacher.collector.Collector`` decides what to collect (which splits, whether chunked) and calls
it at visible points: before training (``sync_and_collect``, whose barriers every rank meets), each
chunk (``prepare_chunk`` collects it in chunked mode, ``finish_chunk`` purges it) and teardown
(``close``). ``TargetStream`` is one training epoch of KD batches, chunk by chunk.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from distill.cache.lock import WriterLock
from distill.cache.reader import CacheReader
from distill.cache.spec import CacheSpec
from distill.cache.store import TeacherCache, open_cache
from distill.data.batch import TokenBatch
from distill.data.batching import Collator
from distill.data.encoding import Encoded
from distill.data.resume import Part, ResumableStream
from distill.data.templates import ChatTemplate
from distill.teacher.batches import KDCollator, TargetedSamples, teacher_reads, trainable_positions
from distill.teacher.collect import collect, plan_jobs, sync_cache, writer_locks
from distill.teacher.cross import TextAxis
from distill.teacher.join import CrossJoin, JoinStats
from distill.teacher.module import TeacherModule

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy


@dataclass
class Collection:
    """What collection runs with: the student's collator and chat template (teachers with their own
    template align to it), this rank's device and place, and the strategy whose barriers the ranks meet
    at (None outside a trainer: one process)."""

    collator: Collator
    template: ChatTemplate | None
    device: torch.device
    rank: int = 0
    world_size: int = 1
    strategy: Strategy | None = None


class TeacherTargets:
    """The teachers' targets of a data module's samples, in the caches under ``cache_dir``: ``train``
    and ``val``, or ``train-chunks/rank<k>`` holding one chunk at a time (chunked mode)."""

    def __init__(
        self,
        teacher: TeacherModule,
        cache_dir: str | Path,
        rebuild: bool = False,
        prune: bool = False,
        lock_timeout: float | None = None,
        batch_size: int = 8,
    ) -> None:
        self.teacher = teacher
        self.names = [t.key for t in teacher.teachers]
        self.cache_dir = Path(cache_dir)
        self.rebuild = rebuild
        self.prune = prune
        self.lock_timeout = lock_timeout
        self.batch_size = batch_size
        self.spec: CacheSpec | None = None
        self.collection: Collection | None = None
        self.chunked = False
        self.collate: KDCollator | None = None
        self.readers: dict[str, CacheReader] = {}
        self._chunk_cache: TeacherCache | None = None
        self._chunk_reader: CacheReader | None = None  # the reader of the chunk now on disk
        self._chunks_lock: WriterLock | None = None  # rank 0 owns train-chunks/ for the whole run

    def start(self, spec: CacheSpec, collection: Collection, *, chunked: bool, packing: bool) -> None:
        """Collect for ``spec`` with ``collection``; ``chunked``: training targets one chunk at a time."""
        self.spec, self.collection, self.chunked = spec, collection, chunked
        joins = None
        if spec.teacher_terms:  # teachers of another tokenizer: aligned to the student at each batch
            student = TextAxis(self.teacher.tokenizer, collection.template, "student")
            axes = [self.teacher.text_axis(i, collection.template) for i in range(len(self.names))]
            joins = [CrossJoin(axis, student) for axis in axes]
        self.collate = KDCollator(collection.collator, packing, self.teacher.vocab_size, joins)

    def sync_and_collect(self, splits: list[tuple[str, list[Encoded]]]) -> int:
        """Rank 0 syncs the caches holding their writer locks until every rank has collected what its
        shard lacks (a second run waits, then plans again and collects nothing twice), then every rank
        opens their readers; returns the number of samples this rank collected."""
        run = self.collection
        rank, world = run.rank, run.world_size
        locks = ExitStack()
        if rank == 0:
            locks = writer_locks([self.cache_dir / split for split, _ in splits], self.lock_timeout)
        with locks:
            if rank == 0:
                for split, samples in splits:
                    sync_cache(self.cache_dir / split, self.spec, samples, self.rebuild, self.prune)
                if self.chunked:
                    self.own_chunk_directories()
            if run.strategy is not None:
                run.strategy.barrier("kd-cache-sync")
            caches = [
                (open_cache(self.cache_dir / split, self.spec), samples[rank::world])
                for split, samples in splits
            ]
            jobs = plan_jobs(self.teacher, caches, template=run.template)
            collected = collect(
                self.teacher, jobs, run.collator, self.batch_size, run.device, rank, template=run.template
            )
            if run.strategy is not None:
                run.strategy.barrier("kd-cache-collected")
        for split, _ in splits:
            self.readers[split] = CacheReader(self.cache_dir / split)
        return collected

    def own_chunk_directories(self) -> None:
        """Lock ``train-chunks/`` for this run (another run on the same cache_dir waits until this one
        ends: the chunks are this run's disk budget) and purge what an earlier run left there."""
        self._chunks_lock = WriterLock(self.cache_dir / "train-chunks", self.lock_timeout)
        self._chunks_lock.acquire()
        for leftover in (self.cache_dir / "train-chunks").glob("rank*"):
            shutil.rmtree(leftover)

    def open_chunks(self) -> None:
        """This rank's chunk cache (chunked mode), after rank 0 has purged what an earlier run left."""
        path = self.cache_dir / "train-chunks" / f"rank{self.collection.rank:03d}"
        self._chunk_cache = open_cache(path, self.spec)

    def perplexities(self, splits: dict[str, list[Encoded]], tokens: str) -> dict[str, float]:
        """Each teacher's perplexity on the tokens the student trains on (``tokens`` names them), per
        split, logged and returned as ``teacher_ppl/<teacher>/<split>``: a teacher above the student's own
        ``val/ppl`` has little to teach."""
        found = {}
        for name in self.names:
            parts = []
            for split, samples in sorted(splits.items(), key=lambda item: item[0] != "train"):
                nll = self.readers[split].nll([s.sha for s in samples], name)
                known = np.isfinite(nll)  # NaN: collected before the teacher's NLL was stored
                positions = sum(trainable_positions(s) for s, k in zip(samples, known, strict=True) if k)
                if self.spec.teacher_terms:  # per token of the teacher's own, over whole records
                    shas = [s.sha for s, k in zip(samples, known, strict=True) if k]
                    positions = int(self.readers[split].num_positions(shas, name).sum())
                if not positions:
                    parts.append(f"{split} n/a (cache collected before teacher NLLs were stored)")
                    continue
                ppl = math.exp(float(nll[known].sum()) / positions)
                found[f"teacher_ppl/{name}/{split}"] = ppl
                parts.append(f"{split} {ppl:.1f}")
            rank_zero_info(f"[distill] teacher {name} perplexity on {tokens} tokens: {', '.join(parts)}")
        return found

    # ---- chunks ------------------------------------------------------------------------------------

    def prepare_chunk(self, samples: list[Encoded]) -> CacheReader:
        """A reader holding this rank's samples of the chunk; in chunked mode they are collected first."""
        if not self.chunked:
            return self.readers["train"]
        self.purge_chunk()  # left by an epoch cut short whose stream was not closed: one chunk at a time
        run = self.collection
        jobs = plan_jobs(self.teacher, [(self._chunk_cache, samples)], template=run.template)
        collect(
            self.teacher, jobs, run.collator, self.batch_size, run.device, run.rank, template=run.template
        )
        self._chunk_reader = CacheReader(self._chunk_cache.path)
        return self._chunk_reader

    def finish_chunk(self, reader: CacheReader) -> None:
        """Purge the chunk ``reader`` reads, unless a newer chunk has replaced it already."""
        if self.chunked and reader is self._chunk_reader:
            self.purge_chunk()

    def purge_chunk(self) -> None:
        """Close the chunk's reader and delete its targets (chunked mode)."""
        if self._chunk_reader is not None:
            self._chunk_reader.close()
            self._chunk_reader = None
        if self._chunk_cache is not None:
            self._chunk_cache.clear()

    def batch(self, rows: list[list[Encoded]], reader: CacheReader) -> TokenBatch:
        """The student batch of ``rows`` with each teacher's targets of them, read by ``reader``."""
        shas = [s.sha for row in rows for s in row]
        return self.collate(rows, *teacher_reads(reader, shas, self.names, self.spec.teacher_terms))

    # ---- validation --------------------------------------------------------------------------------

    def holds(self, split: str) -> bool:
        """Whether ``split``'s targets were collected (a split without samples has no cache)."""
        return split in self.readers

    def targeted(self, rows: list, split: str) -> TargetedSamples:
        """The rows of ``split`` with their targets."""
        return TargetedSamples(rows, self.readers[split], self.names, self.spec.teacher_terms)

    def collate_targeted(self, items: list) -> TokenBatch:
        """A batch of ``TargetedSamples`` items."""
        rows = [row for row, _, _, _ in items]
        targets = [
            [t for _, per_teacher, _, _ in items for t in per_teacher[i]] for i in range(len(self.names))
        ]
        nll = {name: sum(item[2][name] for item in items) for name in self.names}
        spans = None
        if self.spec.teacher_terms:
            spans = [[p for *_, places in items for p in places[i]] for i in range(len(self.names))]
        return self.collate(rows, targets, nll, spans)

    def alignment(self, split: str, samples: list[Encoded], limit: int = 256) -> dict[str, float]:
        """Per teacher of another tokenizer, what aligning ``samples`` (up to ``limit`` of them) to the
        student keeps: logged at the start and returned as ``align/<teacher>/{aligned_share,mapped_mass}``."""
        if not self.spec.teacher_terms or not samples:
            return {}
        samples = list(samples[:limit])
        targets, _, spans = teacher_reads(self.readers[split], [s.sha for s in samples], self.names, True)
        found = {}
        for name, join, rows, places in zip(self.names, self.collate.joins, targets, spans, strict=True):
            stats = JoinStats()
            stats.add(join(samples, rows, places))
            rank_zero_info(
                f"[distill] teacher {name} (another tokenizer) on {len(samples)} {split} samples: "
                f"{stats.aligned_share:.1%} of the student's trained positions aligned "
                f"({stats.positions - stats.aligned} unaligned: hard label only), "
                f"mapped mass {stats.mapped_mass:.3f}"
            )
            found[f"align/{name}/aligned_share"] = stats.aligned_share
            found[f"align/{name}/mapped_mass"] = stats.mapped_mass
        return found

    # ---- the end -----------------------------------------------------------------------------------

    def close(self) -> None:
        self.purge_chunk()  # a fit stopped mid-chunk leaves no targets beyond the budget's caches
        self.release_chunk_directories()
        for reader in self.readers.values():  # lets other runs delete what they superseded
            reader.close()

    def release_chunk_directories(self) -> None:
        if self._chunks_lock is not None:
            self._chunks_lock.release()


class TargetStream(ResumableStream):
    """One epoch of KD batches, chunk by chunk; the same order on every run with the same seed and epoch.

    ``plan(epoch)`` gives the chunks (lists of indices of ``rows``). Each rank takes every world-th row
    of a chunk, and all ranks stop at the same batch count per chunk (DDP needs equal steps), a count
    that depends on the chunk's size alone. A chunk is collected (chunked mode) when its first batch not
    trained before a resume is due, and purged when its batches are done or the epoch is cut short
    (``max_steps``, a stop) and the stream is closed. With workers, each opens its own HDF5 handles.
    """

    def __init__(
        self,
        targets: TeacherTargets,
        rows: list[list[Encoded]],
        batch_size: int,
        plan: Callable[[int], list[list[int]]],
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__(batch_size, rank, world_size)
        self.targets = targets
        self.rows = rows
        self.plan = plan

    def batches(self, chunk: list[int]) -> list[list[list[Encoded]]]:
        """This rank's batches of one chunk: lists of rows (each row one sample, or several when packing)."""
        size = self.batch_size
        steps = math.ceil(len(chunk) // self.world_size / size)  # the smallest rank share's batch count
        mine = [self.rows[i] for i in chunk[self.rank :: self.world_size]]
        return [mine[b : b + size] for b in range(0, len(mine), size)][:steps]

    def parts(self, epoch: int) -> list[Part]:
        chunks = map(self.batches, self.plan(epoch))
        return [Part(len(batches), partial(self.chunk, batches)) for batches in chunks]

    @contextmanager
    def chunk(self, batches: list[list[list[Encoded]]]) -> Iterator[Callable[[int], TokenBatch]]:
        """The chunk's targets, collected (chunked mode) while its batches are built, then purged."""
        reader = self.targets.prepare_chunk([s for rows in batches for row in rows for s in row])
        try:
            yield lambda number: self.targets.batch(batches[number], reader)
        finally:
            self.targets.finish_chunk(reader)
