"""KDDataModule: the data module with the teachers' targets composed in (``TeacherTargets``), collected
before training and, when they would not fit the disk budget, chunk by chunk during it (``Collector``
drives both); with ``rounds``, each chunk is a round the student samples (``distill.rollout.rounds``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from distill.data.batching import pack
from distill.data.datamodule import DataModule
from distill.data.facts import DataFacts
from distill.data.resume import ResumableLoader
from distill.ranges import require
from distill.rollout.rounds import OnPolicyRounds, Rounds
from distill.teacher.collect import cache_spec, check_vocabularies, label_policy
from distill.teacher.collector import Collector
from distill.teacher.module import Teacher, TeacherModule
from distill.teacher.sparse import Sparsity
from distill.teacher.targets import Collection, TeacherTargets


class KDDataModule(DataModule):
    # options an older config gives here, and where they went (the CLI names the new place)
    moved_options: ClassVar[dict[str, str]] = {
        option: f"write data.sparsity: {{{option}: ...}} (distill.teacher.sparse.Sparsity)"
        for option in ("k", "scheme", "num_draws", "draw_temperature")
    }

    def __init__(
        self,
        teachers: list[Teacher],
        sparsity: Sparsity | None = None,
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
            sparsity: What is kept of each teacher distribution (``Sparsity``; default: the top 64).
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
        require("data.value_bits", value_bits, at_least=2, at_most=16)
        require("data.cache_lock_timeout", cache_lock_timeout, at_least=0)
        require("data.teacher_batch_size", teacher_batch_size, at_least=1)
        require("data.chunk_samples", chunk_samples, at_least=1)
        if cache_size_gb is not None and cache_size_gb <= 0:
            raise ValueError(
                "data.cache_size_gb must be a positive disk budget in GB, or null for no limit; "
                f"got {cache_size_gb}"
            )
        super().__init__(**kwargs)
        self.teacher = TeacherModule(teachers, sparsity, tokenizer=self.tokenizer_name)
        self.targets = TeacherTargets(
            self.teacher,
            cache_dir,
            rebuild=rebuild_cache,
            prune=prune_cache,
            lock_timeout=cache_lock_timeout,
            batch_size=teacher_batch_size or self.eval_batch_size,
        )
        self.collector = Collector(self.targets, cache_size_gb, chunk_samples, self.seed)
        self.value_bits = value_bits
        self.rounds = (
            None
            if rounds is None
            else OnPolicyRounds(rounds, self.targets, cache_dir, self.max_seq_length, kwargs)
        )
        self._ready = False

    @property
    def trains_on_files(self) -> bool:
        return super().trains_on_files and self.rounds is None

    def facts(self) -> DataFacts:
        cross = any(t.tokenizer is not None for t in self.teacher.teachers)
        return replace(super().facts(), teacher_names=tuple(self.targets.names), cross_tokenizer=cross)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._ready:
            return
        check_vocabularies(self.teacher, self.tokenizer)  # before any teacher is loaded
        if self.rounds is not None:  # their prompts are refused before any teacher runs
            self.rounds.setup(self.trainer.strategy if self.trainer else None)
            # the rounds train on conversations: the cache records, and teachers with a template of
            # their own align to, the template that encodes them, validation conversations or not
            self.resolve_chat_template()
        if any(t.template is not None or t.tokenizer is not None for t in self.teacher.teachers):
            # such a teacher renders each record in its own template: the mapped samples carry none
            self.attach_records()
        spec = cache_spec(
            self.teacher,
            self.tokenizer,
            self.chat_template,
            self.max_seq_length,
            self.value_bits,
            label_policy(self),
        )
        rows = pack(self.train, self.max_seq_length) if self.packing else [[sample] for sample in self.train]
        tokens = "assistant" if self.train_on_responses_only else "trained"
        self.stats.update(
            self.collector.before_fit(
                spec,
                self.collection(),
                self.train,
                rows,
                self.val,
                round_positions=None if self.rounds is None else self.rounds.positions(self._world_size),
                packing=self.packing,
                tokens=tokens,
            )
        )
        self._ready = True

    def collection(self) -> Collection:
        """What this rank collects with: the student's collator and template, its device and place."""
        strategy = self.trainer.strategy if self.trainer else None
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        return Collection(self.collator, self.chat_template, device, self._rank, self._world_size, strategy)

    def state_dict(self) -> dict[str, Any]:
        return self.rounds.state_dict() if self.rounds is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.rounds is not None:
            self.rounds.load_state_dict(state)

    def teardown(self, stage: str) -> None:
        self.targets.close()

    def on_exception(self, exception: BaseException) -> None:
        self.targets.release_chunk_directories()  # Lightning skips teardown after a failure

    # ---- loaders -----------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank, self._world_size
        if self.rounds is not None:  # batches the student builds at its training step: sampled rounds
            stream = self.rounds.stream(self.batch_size, rank, world, lambda: self.trainer.global_step)
        else:
            stream = self.collector.stream(self.batch_size, rank, world)
        # collection (and sampling) runs on the accelerator, in the main process: no workers then
        workers = 0 if self.collector.chunked else self.num_workers
        return ResumableLoader(stream, self._progress, num_workers=workers)

    def val_dataloader(self) -> DataLoader:
        if not self.targets.holds("val"):
            return []
        return self.eval_loader(
            self.targets.targeted(self._rows(self.val, None), "val"), self.targets.collate_targeted
        )

    test_dataloader = val_dataloader
