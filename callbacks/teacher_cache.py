"""Write teacher predictions into the HDF5 cache, on a background thread, after syncing it with the data."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from distill.cache import CacheSpec, TeacherCache, open_cache
from distill.teacher.collect import (
    BackgroundWriter,
    Job,
    cache_spec,
    check_vocabularies,
    job_list,
    label_policy,
    plan_jobs,
    sync_cache,
    writer_locks,
)


class TeacherCacheWriter(BasePredictionWriter):
    """Syncs the caches with the dataset at setup, then appends each predicted batch to them.

    At setup, before any teacher is loaded, rank 0 takes the caches' writer locks (held until the end of
    predict; docs/cache.md, "Locks") and syncs them; then one predict job per (teacher, split) lists the
    samples that teacher lacks. Writing runs on a thread so the next batch's forward overlaps it.
    """

    def __init__(
        self,
        path: str = "cache/train",
        val_path: str | None = "cache/val",
        rebuild: bool = False,
        value_bits: int = 6,
        commit_seconds: float = 30.0,
        prune: bool = False,
        lock_timeout: float | None = None,
    ) -> None:
        """
        Args:
            path: Cache directory of the training split.
            val_path: Cache directory of the validation split (None: not collected).
            rebuild: Delete a cache built with other settings instead of failing.
            value_bits: Resolution of the stored head values (6 bits: ~1e-4 nats KL).
            commit_seconds: Longest time collected work stays uncommitted (lost by a crash).
            prune: Drop cached samples that are not in this run's data (default: keep them).
            lock_timeout: Seconds to wait for another run writing the same cache (None: as long as it
                takes), then fail naming it.
        """
        super().__init__(write_interval="batch")
        self.paths = {"train": Path(path), **({"val": Path(val_path)} if val_path else {})}
        self.rebuild = rebuild
        self.value_bits = value_bits
        self.commit_seconds = commit_seconds
        self.prune = prune
        self.lock_timeout = lock_timeout
        self.caches: dict[str, TeacherCache] = {}
        self.jobs: list[Job] = []  # one per predict dataloader
        self._writer: BackgroundWriter | None = None
        self._locks = ExitStack()  # rank 0's writer locks of the caches, from setup to the end of predict

    def spec(self, trainer: L.Trainer, pl_module: L.LightningModule) -> CacheSpec:
        data = trainer.datamodule
        return cache_spec(
            pl_module,
            data.tokenizer,
            data.chat_template,
            data.max_seq_length,
            self.value_bits,
            label_policy(data),
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        data = trainer.datamodule
        check_vocabularies(pl_module, data.tokenizer)
        spec = self.spec(trainer, pl_module)
        splits = {"train": data.train, "val": data.val}
        if trainer.is_global_zero:
            self._locks = writer_locks(self.paths.values(), self.lock_timeout)
            for split, path in self.paths.items():
                sync_cache(path, spec, splits[split], rebuild=self.rebuild, prune=self.prune)
        trainer.strategy.barrier("teacher-cache-sync")
        for split, path in self.paths.items():
            self.caches[split] = open_cache(path, spec)
        caches = [(self.caches[split], splits[split]) for split in self.paths]
        self.jobs = plan_jobs(pl_module, caches, template=data.chat_template)
        pl_module.prepare_jobs(job_list(self.jobs), data.chat_template)
        data.predict_only([job.samples for job in self.jobs])
        trainer.predict_loop.return_predictions = False  # outputs go to disk, not into a list in memory

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank

        def open_writer(j: int):
            job = self.jobs[j]
            name = pl_module.teachers[job.teacher_index].key
            return job.cache.writer(name, rank, commit_seconds=self.commit_seconds)

        self._writer = BackgroundWriter(open_writer)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        self._writer.put(dataloader_idx, prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.release()
        self._writer.close()
        trainer.strategy.barrier("teacher-cache-written")  # every rank's segments are committed
        self._locks.close()
        for split, cache in self.caches.items():
            rank_zero_info(f"[distill] cache {split}: {cache.stats()}")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._locks.close()  # Lightning skips teardown after a failure; the next run must not wait
