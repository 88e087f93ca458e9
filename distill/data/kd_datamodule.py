"""KDDataModule: the data module plus teacher targets from the cache, collected inside ``fit`` as needed.

At setup the caches are synced with the data and whatever they lack is collected (the same
``TeacherModule`` and cache code as ``predict``). Training batches then stream from the cache chunk by
chunk, chunk order and in-chunk order shuffled per epoch from the seed. When the whole training set's
targets would not fit ``cache_size_gb``, each epoch alternates instead: collect chunk i (teacher loaded,
then freed), train on it, purge it, next chunk; the disk never holds more than the budget.

Lightning reads an epoch's length once, before the first epoch, so every epoch must yield exactly that
many batches: the rows (packed once) and the chunks are the same in every epoch; only their order
changes.
"""

from __future__ import annotations

import math
import random
import shutil
import uuid
from contextlib import ExitStack
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from distill.cache import CacheReader, CacheSpec, TeacherCache, WriterLock, open_cache
from distill.data.batching import EvalBatches, pack
from distill.data.datamodule import DataModule
from distill.data.encoding import Encoded
from distill.data.facts import DataFacts
from distill.data.kd_batches import (
    SEGMENT_BYTES,
    KDCollator,
    TargetedSamples,
    TargetStream,
    bytes_per_position_bound,
    fill_chunks,
    trainable_positions,
)
from distill.data.resume import ResumableLoader, epoch_rng, leave_sigterm_to_main
from distill.data.rounds import Rounds, RoundSamples, RoundStream
from distill.ranges import require
from distill.teacher.collect import (
    cache_spec,
    check_vocabularies,
    collect,
    label_policy,
    plan_jobs,
    sync_cache,
    writer_locks,
)
from distill.teacher.module import Scheme, Teacher, TeacherModule


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
        prune_cache: bool = False,
        cache_lock_timeout: float | None = None,
        teacher_batch_size: int | None = None,
        chunk_samples: int = 256,
        rounds: Rounds | None = None,
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
            prune_cache: Drop cached samples that are not in this run's data (default: keep them, so a
                subset run never costs the full run its targets; ``python -m distill cache prune``).
            cache_lock_timeout: Seconds to wait while another run writes the caches (None: as long as
                it takes), then fail naming that run.
            teacher_batch_size: Samples per teacher forward (default: ``eval_batch_size``).
            chunk_samples: Samples per streamed chunk when the whole cache fits.
            rounds: On-policy rounds: ``train_files`` are prompts; each round the student samples
                completions of some, the teachers' targets of those are collected into the chunk cache,
                the student trains on them (``distill.data.rounds``).
            **kwargs: Everything ``DataModule`` takes (files, template, max_seq_length, packing, ...).
        """
        if kwargs.get("streaming"):
            raise ValueError(
                "data.streaming does not combine with distillation: the teacher cache is keyed by known "
                "samples; distil from files (chunked under data.cache_size_gb when the targets are large)"
            )
        require("data.k", k, at_least=0)
        require("data.num_draws", num_draws, at_least=0)
        require("data.draw_temperature", draw_temperature, above=0)
        require("data.value_bits", value_bits, at_least=2, at_most=16)
        require("data.cache_lock_timeout", cache_lock_timeout, at_least=0)
        require("data.teacher_batch_size", teacher_batch_size, at_least=1)
        require("data.chunk_samples", chunk_samples, at_least=1)
        if cache_size_gb is not None and cache_size_gb <= 0:
            raise ValueError(
                "data.cache_size_gb must be a positive disk budget in GB, or null for no limit; "
                f"got {cache_size_gb}"
            )
        if rounds is not None and (kwargs.get("packing") or kwargs.get("val_fraction")):
            raise ValueError(
                "data.rounds trains on each round's completions as they come: no packing, and validation "
                "from data.val_files (SFT records), not val_fraction of the prompts"
            )
        super().__init__(**kwargs)
        self.rounds = rounds
        self._round_samples: RoundSamples | None = None
        self.rounds_run: str | None = None  # names this fit's rounds; checkpointed, so a resume keeps it
        self.teachers = teachers
        self.teacher = TeacherModule(
            teachers,
            tokenizer=self.tokenizer_name,
            k=k,
            scheme=scheme,
            num_draws=num_draws,
            temperature=draw_temperature,
        )
        self.value_bits = value_bits
        self.cache_dir = Path(cache_dir)
        self.cache_size_gb = cache_size_gb
        self.rebuild_cache = rebuild_cache
        self.prune_cache = prune_cache
        self.cache_lock_timeout = cache_lock_timeout
        self.teacher_batch_size = teacher_batch_size or self.eval_batch_size
        self.chunk_samples = chunk_samples
        self.teacher_names = [t.key for t in teachers]
        self.spec: CacheSpec | None = None
        self.chunked = False
        self.readers: dict[str, CacheReader] = {}
        self._chunk_cache: TeacherCache | None = None
        self._chunk_reader: CacheReader | None = None  # the reader of the chunk now on disk
        self._chunks_lock: WriterLock | None = None  # rank 0 owns train-chunks/ for the whole run
        self._ready = False

    @property
    def trains_on_files(self) -> bool:
        return super().trains_on_files and self.rounds is None

    def facts(self) -> DataFacts:
        return replace(super().facts(), teacher_names=tuple(self.teacher_names))

    # ---- setup: sync, then collect what is missing ----------------------------------------------------

    def estimated_bytes(self, samples: list[Encoded]) -> float:
        return sum(map(trainable_positions, samples)) * bytes_per_position_bound(self.spec)

    def split_bytes(self, samples: list[Encoded]) -> float:
        """A bound of the disk a cache directory of ``samples`` takes."""
        return self.estimated_bytes(samples) + SEGMENT_BYTES if samples else 0.0

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._ready:
            return
        check_vocabularies(self.teacher, self.tokenizer)  # before any teacher is loaded
        if any(t.template is not None for t in self.teachers):
            # such a teacher renders each record in its own template: the mapped samples carry none
            self.attach_records()
        self.spec = cache_spec(
            self.teacher,
            self.tokenizer,
            self.chat_template,
            self.max_seq_length,
            self.value_bits,
            label_policy(self),
        )
        budget = None if self.cache_size_gb is None else self.cache_size_gb * 1e9
        total = self.split_bytes(self.train) + self.split_bytes(self.val)
        self.chunked = self.rounds is not None or (budget is not None and total > budget)
        rank = self._rank
        full = [("val", self.val)] + ([] if self.chunked else [("train", self.train)])
        full = [(split, samples) for split, samples in full if samples]
        collected = self.sync_and_collect(full)
        rank_zero_info(f"[distill] collected {collected} samples on rank 0 before training")
        for split, _ in full:
            self.readers[split] = CacheReader(self.cache_dir / split)
        if rank == 0:
            self.report_teachers(dict(full))
        if self.rounds is not None:
            self.setup_rounds()
        elif self.chunked:
            train_budget = self.chunk_budget
            largest = max(map(self.estimated_bytes, self.train_rows))
            if train_budget < largest:
                raise ValueError(
                    f"data.cache_size_gb={self.cache_size_gb} leaves {train_budget / 1e9:.3g} GB for "
                    f"training "
                    f"targets, less than one sample (or packed row) needs ({largest / 1e9:.3g} GB)"
                )
        if self.chunked:
            self._chunk_cache = open_cache(self.cache_dir / "train-chunks" / f"rank{rank:03d}", self.spec)
        if self.chunked and self.rounds is None:
            rank_zero_info(
                f"[distill] chunked KD: ~{total / 1e9:.3g} GB of targets > "
                f"cache_size_gb {self.cache_size_gb}; "
                f"{len(self.plan(0))} chunks per epoch"
            )
        self._ready = True

    def setup_rounds(self) -> None:
        """Read the rounds' prompts and check that one round's targets fit the disk budget."""
        self._round_samples = RoundSamples(self.rounds, self)
        run = uuid.uuid4().hex[:12]
        self.rounds_run = self.trainer.strategy.broadcast(run) if self.trainer else run
        positions = self._round_samples.per_rank(self._world_size) * (self.rounds.max_new_tokens + 1)
        needs = positions * bytes_per_position_bound(self.spec)
        if self.cache_size_gb is not None and self.chunk_budget < needs:
            raise ValueError(
                f"data.cache_size_gb={self.cache_size_gb} leaves {self.chunk_budget / 1e9:.3g} GB for a "
                f"round's targets, which may take {needs / 1e9:.3g} GB: lower data.rounds.prompts_per_round"
            )
        rank_zero_info(
            f"[distill] on-policy rounds: {self.rounds.num_rounds} per epoch, "
            f"{self.rounds.prompts_per_round} prompts x {self.rounds.num_generations} completions each, "
            f"written under {self.rounds_directory.parent}"
        )

    @property
    def rounds_directory(self) -> Path:
        """Where this fit's rounds are written: a new fit's own directory, a resumed fit's earlier one."""
        base = Path(self.rounds.directory) if self.rounds.directory else self.cache_dir / "rounds"
        return base / f"run-{self.rounds_run}"

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_run": self.rounds_run} if self.rounds is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed fit reads back the rounds its first part sampled (Lightning restores this after
        ``setup``, before the first batch)."""
        if self.rounds is not None and state.get("rounds_run"):
            self.rounds_run = state["rounds_run"]

    def round_samples(self, index: int, policy: nn.Module, synced: bool) -> list[Encoded]:
        """Round ``index``'s samples of this rank, sampled by ``policy``, the student being trained
        (``synced``: its weights are sharded, every rank samples at once)."""
        return self._round_samples.samples(
            self.rounds_directory, index, policy,
            rank=self._rank, world_size=self._world_size, synced=synced, step=self.trainer.global_step,
        )  # fmt: skip

    def sync_and_collect(self, splits: list[tuple[str, list[Encoded]]]) -> int:
        """Rank 0 syncs the caches holding their writer locks until every rank has collected what its
        shard lacks (a second run waits, then plans again and collects nothing twice); returns the
        number of samples this rank collected."""
        strategy = self.trainer.strategy if self.trainer else None
        rank, world = self._rank, self._world_size
        locks = ExitStack()
        if rank == 0:
            locks = writer_locks([self.cache_dir / split for split, _ in splits], self.cache_lock_timeout)
        with locks:
            if rank == 0:
                for split, samples in splits:
                    sync_cache(
                        self.cache_dir / split, self.spec, samples, self.rebuild_cache, self.prune_cache
                    )
                if self.chunked:
                    self.own_chunk_directories()
            if strategy is not None:
                strategy.barrier("kd-cache-sync")
            caches = [
                (open_cache(self.cache_dir / split, self.spec), samples[rank::world])
                for split, samples in splits
            ]
            jobs = plan_jobs(self.teacher, caches, template=self.chat_template)
            collected = collect(
                self.teacher,
                jobs,
                self.collator,
                self.teacher_batch_size,
                self.device,
                rank,
                template=self.chat_template,
            )
            if strategy is not None:
                strategy.barrier("kd-cache-collected")
        return collected

    def own_chunk_directories(self) -> None:
        """Lock ``train-chunks/`` for this run (another run on the same cache_dir waits until this one
        ends: the chunks are this run's disk budget) and purge what an earlier run left there."""
        self._chunks_lock = WriterLock(self.cache_dir / "train-chunks", self.cache_lock_timeout)
        self._chunks_lock.acquire()
        for leftover in (self.cache_dir / "train-chunks").glob("rank*"):
            shutil.rmtree(leftover)

    def report_teachers(self, splits: dict[str, list[Encoded]]) -> None:
        """Log each teacher's perplexity on the tokens the student trains on, per split (also into
        ``stats``): a teacher above the student's own ``val/ppl`` has little to teach."""
        tokens = "assistant" if self.train_on_responses_only else "trained"
        for name in self.teacher_names:
            parts = []
            for split, samples in sorted(splits.items(), key=lambda item: item[0] != "train"):
                nll = self.readers[split].nll([s.sha for s in samples], name)
                known = np.isfinite(nll)  # NaN: collected before the teacher's NLL was stored
                positions = sum(trainable_positions(s) for s, k in zip(samples, known, strict=True) if k)
                if not positions:
                    parts.append(f"{split} n/a (cache collected before teacher NLLs were stored)")
                    continue
                ppl = math.exp(float(nll[known].sum()) / positions)
                self.stats[f"teacher_ppl/{name}/{split}"] = ppl
                parts.append(f"{split} {ppl:.1f}")
            rank_zero_info(f"[distill] teacher {name} perplexity on {tokens} tokens: {', '.join(parts)}")

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer else torch.device("cpu")

    # ---- chunks ------------------------------------------------------------------------------------

    @cached_property
    def train_rows(self) -> list[list[Encoded]]:
        """The training rows (one sample each, or several when packing), packed once in data order."""
        if self.packing:
            return pack(self.train, self.max_seq_length)
        return [[sample] for sample in self.train]

    @cached_property
    def chunks(self) -> list[list[int]]:
        """The training rows' fixed partition into chunks; each epoch streams them in an order of its own.

        Fixed, so that every epoch yields the same number of batches. Without a budget: consecutive rows
        of up to ``chunk_samples`` samples (neighbours in the cache). In chunked mode: rows drawn in an
        order shuffled from the seed, as many per chunk as fit the disk budget.
        """
        rows = self.train_rows
        if not self.chunked:
            return fill_chunks(range(len(rows)), [len(row) for row in rows], self.chunk_samples)
        order = list(range(len(rows)))
        random.Random(self.seed).shuffle(order)
        return fill_chunks(order, [self.estimated_bytes(row) for row in rows], self.chunk_budget)

    @property
    def chunk_budget(self) -> float:
        """Bytes of positions a chunk may hold: the budget less the validation cache and one segment."""
        return self.cache_size_gb * 1e9 - self.split_bytes(self.val) - SEGMENT_BYTES

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's chunks of training-row indices: their order and the order within each shuffled
        from (seed, epoch)."""
        rng = epoch_rng(self.seed, epoch)
        chunks = [list(chunk) for chunk in self.chunks]
        rng.shuffle(chunks)
        for chunk in chunks:
            rng.shuffle(chunk)
        return chunks

    def prepare_chunk(self, samples: list[Encoded]) -> CacheReader:
        """A reader holding this rank's samples of the chunk; in chunked mode they are collected first."""
        if not self.chunked:
            return self.readers["train"]
        self.purge_chunk()  # left by an epoch cut short whose stream was not closed: one chunk at a time
        jobs = plan_jobs(self.teacher, [(self._chunk_cache, samples)], template=self.chat_template)
        collect(
            self.teacher,
            jobs,
            self.collator,
            self.teacher_batch_size,
            self.device,
            self._rank,
            template=self.chat_template,
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

    def teardown(self, stage: str) -> None:
        self.purge_chunk()  # a fit stopped mid-chunk leaves no targets beyond the budget's caches
        self.release_chunk_directories()
        for reader in self.readers.values():  # lets other runs delete what they superseded
            reader.close()

    def on_exception(self, exception: BaseException) -> None:
        self.release_chunk_directories()  # Lightning skips teardown after a failure

    def release_chunk_directories(self) -> None:
        if self._chunks_lock is not None:
            self._chunks_lock.release()

    # ---- loaders -----------------------------------------------------------------------------------

    @property
    def kd_collator(self) -> KDCollator:
        return KDCollator(self.collator, self.packing, self.spec.vocab_size)

    def train_dataloader(self) -> DataLoader:
        if self.rounds is not None:  # batches the student builds at its training step: sampled rounds
            stream = RoundStream(self, self._round_samples, self._rank, self._world_size)
            return ResumableLoader(stream, self._progress, num_workers=0)
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
            rows = [row for row, _, _ in items]
            targets = [
                [t for _, per_teacher, _ in items for t in per_teacher[i]] for i in range(len(self.teachers))
            ]
            nll = {name: sum(item[2][name] for item in items) for name in self.teacher_names}
            return collate(rows, targets, nll)

        # each rank validates its own shard, every sample once over all ranks (metrics are sums)
        batches = EvalBatches(samples, collate_rows, self.eval_batch_size, self._rank, self._world_size)
        return DataLoader(
            batches, batch_size=None, num_workers=self.num_workers, worker_init_fn=leave_sigterm_to_main
        )

    test_dataloader = val_dataloader
