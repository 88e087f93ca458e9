"""KDDataModule: the data module with the teachers' targets composed in (``TeacherTargets``), collected
inside ``fit`` as needed.

At setup the caches are synced with the data and whatever they lack is collected (the same
``TeacherModule`` and cache code as ``predict``). Training batches then stream from the cache chunk by
chunk, chunk order and in-chunk order shuffled per epoch from the seed. When the whole training set's
targets would not fit ``cache_size_gb``, each epoch alternates instead: collect chunk i (teacher loaded,
then freed), train on it, purge it, next chunk; the disk never holds more than the budget. With
``rounds``, each chunk is a round the student samples (``distill.rollout.rounds``).

Lightning reads an epoch's length once, before the first epoch, so every epoch must yield exactly that
many batches: the rows (packed once) and the chunks are the same in every epoch; only their order
changes.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from distill.data.batching import EvalBatches, pack
from distill.data.datamodule import DataModule
from distill.data.encoding import Encoded
from distill.data.facts import DataFacts
from distill.data.resume import ResumableLoader, epoch_rng, leave_sigterm_to_main
from distill.ranges import require
from distill.rollout.rounds import Rounds, RoundSamples, RoundStream
from distill.teacher.batches import (
    SEGMENT_BYTES,
    bytes_per_position_bound,
    estimated_bytes,
    fill_chunks,
    split_bytes,
)
from distill.teacher.collect import cache_spec, check_vocabularies, label_policy
from distill.teacher.module import Scheme, Teacher, TeacherModule
from distill.teacher.targets import Collection, TargetStream, TeacherTargets

if TYPE_CHECKING:
    from distill.cache.spec import CacheSpec


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
                the student trains on them (``distill.rollout.rounds``).
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
        self.targets = TeacherTargets(
            self.teacher,
            cache_dir,
            rebuild=rebuild_cache,
            prune=prune_cache,
            lock_timeout=cache_lock_timeout,
            batch_size=teacher_batch_size or self.eval_batch_size,
        )
        self.value_bits = value_bits
        self.cache_dir = Path(cache_dir)
        self.cache_size_gb = cache_size_gb
        self.chunk_samples = chunk_samples
        self.spec: CacheSpec | None = None
        self.chunked = False
        self._ready = False

    @property
    def trains_on_files(self) -> bool:
        return super().trains_on_files and self.rounds is None

    def facts(self) -> DataFacts:
        return replace(super().facts(), teacher_names=tuple(self.targets.names))

    # ---- setup: sync, then collect what is missing ----------------------------------------------------

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
        total = split_bytes(self.train, self.spec) + split_bytes(self.val, self.spec)
        self.chunked = self.rounds is not None or (budget is not None and total > budget)
        self.targets.start(self.spec, self.collection(), chunked=self.chunked, packing=self.packing)
        full = [("val", self.val)] + ([] if self.chunked else [("train", self.train)])
        full = [(split, samples) for split, samples in full if samples]
        collected = self.targets.sync_and_collect(full)
        rank_zero_info(f"[distill] collected {collected} samples on rank 0 before training")
        if self._rank == 0:
            tokens = "assistant" if self.train_on_responses_only else "trained"
            self.stats.update(self.targets.perplexities(dict(full), tokens))
        if self.rounds is not None:
            self.setup_rounds()
        elif self.chunked:
            train_budget = self.chunk_budget
            largest = max(estimated_bytes(row, self.spec) for row in self.train_rows)
            if train_budget < largest:
                raise ValueError(
                    f"data.cache_size_gb={self.cache_size_gb} leaves {train_budget / 1e9:.3g} GB for "
                    f"training "
                    f"targets, less than one sample (or packed row) needs ({largest / 1e9:.3g} GB)"
                )
        if self.chunked:
            self.targets.open_chunks()
        if self.chunked and self.rounds is None:
            rank_zero_info(
                f"[distill] chunked KD: ~{total / 1e9:.3g} GB of targets > "
                f"cache_size_gb {self.cache_size_gb}; "
                f"{len(self.plan(0))} chunks per epoch"
            )
        self._ready = True

    def collection(self) -> Collection:
        """What this rank collects with: the student's collator and template, its device and place."""
        strategy = self.trainer.strategy if self.trainer else None
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        return Collection(self.collator, self.chat_template, device, self._rank, self._world_size, strategy)

    def setup_rounds(self) -> None:
        """Read the rounds' prompts and check that one round's targets fit the disk budget."""
        self._round_samples = RoundSamples(self.rounds, self)
        run = uuid.uuid4().hex[:12]
        self.rounds_run = self.trainer.strategy.broadcast(run) if self.trainer else run
        positions = self._round_samples.per_rank(self._world_size) * (self.rounds.sampling.max_new_tokens + 1)
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
        return fill_chunks(order, [estimated_bytes(row, self.spec) for row in rows], self.chunk_budget)

    @property
    def chunk_budget(self) -> float:
        """Bytes of positions a chunk may hold: the budget less the validation cache and one segment."""
        return self.cache_size_gb * 1e9 - split_bytes(self.val, self.spec) - SEGMENT_BYTES

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's chunks of training-row indices: their order and the order within each shuffled
        from (seed, epoch)."""
        rng = epoch_rng(self.seed, epoch)
        chunks = [list(chunk) for chunk in self.chunks]
        rng.shuffle(chunks)
        for chunk in chunks:
            rng.shuffle(chunk)
        return chunks

    def teardown(self, stage: str) -> None:
        self.targets.close()

    def on_exception(self, exception: BaseException) -> None:
        self.targets.release_chunk_directories()  # Lightning skips teardown after a failure

    # ---- loaders -----------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank, self._world_size
        if self.rounds is not None:  # batches the student builds at its training step: sampled rounds
            stream = RoundStream(
                self.targets, self._round_samples, self.round_samples, self.batch_size, rank, world
            )
            return ResumableLoader(stream, self._progress, num_workers=0)
        stream = TargetStream(self.targets, self.train_rows, self.batch_size, self.plan, rank, world)
        # collection runs on the accelerator, in the main process: no workers while chunks are collected
        workers = 0 if self.chunked else self.num_workers
        return ResumableLoader(stream, self._progress, num_workers=workers)

    def val_dataloader(self) -> DataLoader:
        if not self.targets.holds("val"):
            return []
        samples = self.targets.targeted(self._rows(self.val, None), "val")
        # each rank validates its own shard, every sample once over all ranks (metrics are sums)
        batches = EvalBatches(
            samples, self.targets.collate_targeted, self.eval_batch_size, self._rank, self._world_size
        )
        return DataLoader(
            batches, batch_size=None, num_workers=self.num_workers, worker_init_fn=leave_sigterm_to_main
        )

    test_dataloader = val_dataloader
