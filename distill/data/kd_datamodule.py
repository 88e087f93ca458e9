"""KDDataModule: the data module plus teacher targets from the cache, collected inside ``fit`` as needed.

At setup the caches are synced with the data and whatever they lack is collected (the same
``TeacherModule`` and cache code as ``predict``). Training batches then stream from the cache chunk by
chunk, chunk order and in-chunk order shuffled per epoch from the seed. When the whole training set's
targets would not fit ``cache_size_gb``, each epoch alternates instead: collect chunk i (teacher loaded,
then freed), train on it, purge it, next chunk; the disk never holds more than the budget.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, IterableDataset

from distill.cache import CacheReader, CacheSpec, TeacherCache, open_cache
from distill.data.batching import Collator, pack
from distill.data.datamodule import DataModule
from distill.data.encoding import IGNORE_INDEX, Encoded
from distill.data.resume import ResumableLoader, epoch_rng, yields
from distill.targets import SparseTargets, concat_targets
from distill.teacher.collect import (
    cache_spec,
    check_vocabularies,
    collect,
    label_policy,
    plan_jobs,
    sync_cache,
)
from distill.teacher.module import Scheme, Teacher, TeacherModule


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


@dataclass
class KDCollator:
    """Rows of samples -> the student batch plus each teacher's targets at its trainable positions."""

    collator: Collator
    packing: bool
    vocab_size: int

    def __call__(self, rows: list[list[Encoded]], targets: list[list[SparseTargets]]) -> dict[str, Any]:
        """``targets[t][i]``: teacher t's targets of the i-th sample, samples in row order."""
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
        return batch


class TargetStream(IterableDataset):
    """One epoch of KD batches, chunk by chunk; the same order on every run with the same seed and epoch.

    ``plan(epoch)`` gives the chunks (lists of sample indices). Each rank takes every world-th sample of a
    chunk, and all ranks stop at the same batch count per chunk (DDP needs equal steps). ``skip`` batches
    are passed over without reading or collecting anything (resuming mid-epoch). With workers, worker w
    produces batches skip + w, skip + w + W, ... and opens its own HDF5 handles.
    """

    def __init__(self, data: KDDataModule, rank: int, world_size: int) -> None:
        self.data = data
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def batches(self, chunk: list[int]) -> list[list[list[Encoded]]]:
        """This rank's batches of one chunk: lists of rows (each row one sample, or several when packing)."""
        data = self.data
        per_rank = []
        for r in range(self.world_size):
            samples = [data.train[i] for i in chunk[r :: self.world_size]]
            rows = pack(samples, data.max_seq_length) if data.packing else [[s] for s in samples]
            per_rank.append([rows[b : b + data.batch_size] for b in range(0, len(rows), data.batch_size)])
        steps = min(len(b) for b in per_rank)
        return per_rank[self.rank][:steps]

    def __len__(self) -> int:
        return sum(len(self.batches(chunk)) for chunk in self.data.plan(0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        data = self.data
        index = 0
        for chunk in data.plan(self.epoch):
            batches = self.batches(chunk)
            if index + len(batches) <= self.skip:  # a chunk trained before the resume: not even collected
                index += len(batches)
                continue
            reader = data.prepare_chunk([data.train[i] for i in chunk[self.rank :: self.world_size]])
            for rows in batches:
                if yields(index, self.skip):
                    shas = [s.sha for row in rows for s in row]
                    targets = [reader.read(shas, name) for name in data.teacher_names]
                    yield data.kd_collator(rows, targets)
                index += 1
            data.finish_chunk(reader)


class TargetedSamples(Dataset):
    """Map-style (sample rows, targets) for validation; the reader reopens its files in each worker."""

    def __init__(self, rows: list, reader: CacheReader, teacher_names: list[str]) -> None:
        self.rows = rows
        self.reader = reader
        self.teacher_names = teacher_names

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[list[Encoded], list[list[SparseTargets]]]:
        row = self.rows[index] if isinstance(self.rows[index], list) else [self.rows[index]]
        shas = [s.sha for s in row]
        return row, [self.reader.read(shas, name) for name in self.teacher_names]


class KDDataModule(DataModule):
    def __init__(
        self,
        teachers: list[Teacher],
        k: int = 64,
        scheme: Scheme = "topk",
        num_draws: int = 0,
        draw_temperature: float = 1.0,
        value_bits: int = 6,
        cache_dir: str = "cache/kd",
        cache_size_gb: float | None = None,
        rebuild_cache: bool = False,
        teacher_batch_size: int | None = None,
        chunk_samples: int = 256,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            teachers: Teacher models (same vocabulary as the student), collected one after another.
            k: Exact top-k ids stored per position.
            scheme: ``topk``, ``sampled`` (``num_draws`` draws, unbiased) or ``hybrid`` (top-k + tail draws).
            num_draws: Draws per position for ``sampled``/``hybrid``.
            draw_temperature: Temperature of the draws (stored logits stay raw).
            value_bits: Resolution of the stored head values.
            cache_dir: Directory of the caches (``train``, ``val``; ``train-chunks`` in chunked mode).
            cache_size_gb: Disk budget of the caches; when the dataset's targets would exceed it, each
                epoch collects, trains on and purges one chunk at a time. None: no limit.
            rebuild_cache: Delete caches made with other settings instead of failing.
            teacher_batch_size: Samples per teacher forward (default: ``eval_batch_size``).
            chunk_samples: Samples per streamed chunk when the whole cache fits.
            **kwargs: Everything ``DataModule`` takes (files, template, max_seq_length, packing, ...).
        """
        super().__init__(**kwargs)
        self.teachers = teachers
        self.teacher = TeacherModule(
            teachers, k=k, scheme=scheme, num_draws=num_draws, temperature=draw_temperature
        )
        self.value_bits = value_bits
        self.cache_dir = Path(cache_dir)
        self.cache_size_gb = cache_size_gb
        self.rebuild_cache = rebuild_cache
        self.teacher_batch_size = teacher_batch_size or self.eval_batch_size
        self.chunk_samples = chunk_samples
        self.teacher_names = [t.key for t in teachers]
        self.spec: CacheSpec | None = None
        self.chunked = False
        self.readers: dict[str, CacheReader] = {}
        self._chunk_cache: TeacherCache | None = None
        self._ready = False

    # ---- setup: sync, then collect what is missing ----------------------------------------------------

    def estimated_bytes(self, samples: list[Encoded]) -> float:
        return sum(map(trainable_positions, samples)) * bytes_per_position_bound(self.spec)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._ready:
            return
        self.teacher.tokenizer_id = self.tokenizer_name
        check_vocabularies(self.teacher, self.tokenizer)  # before any teacher is loaded
        self.spec = cache_spec(
            self.teacher,
            self.tokenizer,
            self.chat_template,
            self.max_seq_length,
            self.value_bits,
            label_policy(self),
        )
        budget = None if self.cache_size_gb is None else self.cache_size_gb * 1e9
        total = self.estimated_bytes(self.train) + self.estimated_bytes(self.val)
        self.chunked = budget is not None and total > budget
        strategy = self.trainer.strategy if self.trainer else None
        rank, world = self._rank, self._world_size
        full = [("val", self.val)] + ([] if self.chunked else [("train", self.train)])
        full = [(split, samples) for split, samples in full if samples]
        if rank == 0:
            for split, samples in full:
                sync_cache(self.cache_dir / split, self.spec, samples, rebuild=self.rebuild_cache)
            if self.chunked:
                shutil.rmtree(self.cache_dir / "train-chunks", ignore_errors=True)
        if strategy is not None:
            strategy.barrier("kd-cache-sync")
        caches = [
            (open_cache(self.cache_dir / split, self.spec), samples[rank::world]) for split, samples in full
        ]
        jobs = plan_jobs(self.teacher, caches, template=self.chat_template)
        collected = collect(self.teacher, jobs, self.collator, self.teacher_batch_size, self.device, rank)
        if strategy is not None:
            strategy.barrier("kd-cache-collected")
        rank_zero_info(f"[distill] collected {collected} samples on rank 0 before training")
        for split, _ in full:
            self.readers[split] = CacheReader(self.cache_dir / split)
        if self.chunked:
            train_budget = budget - self.estimated_bytes(self.val)
            largest = max(self.estimated_bytes([s]) for s in self.train)
            if train_budget < largest:
                raise ValueError(
                    f"data.cache_size_gb={self.cache_size_gb} leaves {train_budget / 1e9:.3g} GB for "
                    f"training "
                    f"targets, less than one sample needs ({largest / 1e9:.3g} GB)"
                )
            self._chunk_cache = open_cache(self.cache_dir / "train-chunks" / f"rank{rank:03d}", self.spec)
            rank_zero_info(
                f"[distill] chunked KD: ~{total / 1e9:.3g} GB of targets > "
                f"cache_size_gb {self.cache_size_gb}; "
                f"{len(self.plan(0))} chunks per epoch"
            )
        self._ready = True

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer else torch.device("cpu")

    # ---- chunks ------------------------------------------------------------------------------------

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's chunks of training-sample indices, shuffled from (seed, epoch)."""
        rng = epoch_rng(self.seed, epoch)
        n = len(self.train)
        if not self.chunked:
            chunks = [list(range(i, min(i + self.chunk_samples, n))) for i in range(0, n, self.chunk_samples)]
            rng.shuffle(chunks)
            for chunk in chunks:
                rng.shuffle(chunk)
            return chunks
        order = list(range(n))
        rng.shuffle(order)
        budget = self.cache_size_gb * 1e9 - self.estimated_bytes(self.val)
        chunks, current, used = [], [], 0.0
        for i in order:
            size = self.estimated_bytes([self.train[i]])
            if current and used + size > budget:
                chunks.append(current)
                current, used = [], 0.0
            current.append(i)
            used += size
        return chunks + ([current] if current else [])

    def prepare_chunk(self, samples: list[Encoded]) -> CacheReader:
        """A reader holding this rank's samples of the chunk; in chunked mode they are collected first."""
        if not self.chunked:
            return self.readers["train"]
        jobs = plan_jobs(self.teacher, [(self._chunk_cache, samples)], template=self.chat_template)
        collect(self.teacher, jobs, self.collator, self.teacher_batch_size, self.device, self._rank)
        return CacheReader(self._chunk_cache.path)

    def finish_chunk(self, reader: CacheReader) -> None:
        if self.chunked:
            reader.close()
            self._chunk_cache.clear()

    # ---- loaders -----------------------------------------------------------------------------------

    @property
    def kd_collator(self) -> KDCollator:
        return KDCollator(self.collator, self.packing, self.spec.vocab_size)

    def train_dataloader(self) -> DataLoader:
        stream = TargetStream(self, self._rank, self._world_size)
        # collection runs on the accelerator, in the main process: no workers while chunks are collected
        workers = 0 if self.chunked else self.num_workers
        return ResumableLoader(stream, self._progress, num_workers=workers)

    def val_dataloader(self) -> DataLoader:
        if "val" not in self.readers:
            return []
        samples = TargetedSamples(self._rows(self.val, None), self.readers["val"], self.teacher_names)
        collate = self.kd_collator

        def collate_rows(items: list) -> dict[str, Any]:
            rows = [row for row, _ in items]
            targets = [
                [t for _, per_teacher in items for t in per_teacher[i]] for i in range(len(self.teachers))
            ]
            return collate(rows, targets)

        return DataLoader(
            samples, batch_size=self.eval_batch_size, collate_fn=collate_rows, num_workers=self.num_workers
        )

    test_dataloader = val_dataloader
