"""Write teacher predictions into the HDF5 cache, on a background thread, after syncing it with the data."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoTokenizer

from distill.cache import CacheSpec, CacheWriter, TeacherCache, open_cache
from distill.identity import check_same_vocabulary, tokenizer_hash
from distill.targets import SparseTargets

_DONE = object()


class TeacherCacheWriter(BasePredictionWriter):
    """Syncs the caches with the dataset at setup, then appends each predicted batch to them.

    At setup (before any teacher is loaded): the teachers' vocabularies are checked against the
    student's tokenizer, the caches are opened against the run's settings (a stale cache is an error
    unless ``rebuild``), samples no longer in the data are dropped, and one predict job per (teacher,
    split) lists the samples that teacher lacks. Writing runs on a thread so the next batch's forward
    overlaps it; segments are committed every ``commit_seconds`` so a killed run keeps its work.
    """

    def __init__(
        self,
        path: str = "cache/train",
        val_path: str | None = "cache/val",
        rebuild: bool = False,
        value_bits: int = 6,
        commit_seconds: float = 30.0,
    ) -> None:
        """
        Args:
            path: Cache directory of the training split.
            val_path: Cache directory of the validation split (None: not collected).
            rebuild: Delete a cache built with other settings instead of failing.
            value_bits: Resolution of the stored head values (6 bits: ~1e-4 nats KL).
            commit_seconds: Longest time collected work stays uncommitted (lost by a crash).
        """
        super().__init__(write_interval="batch")
        self.paths = {"train": Path(path), **({"val": Path(val_path)} if val_path else {})}
        self.rebuild = rebuild
        self.value_bits = value_bits
        self.commit_seconds = commit_seconds
        self.caches: dict[str, TeacherCache] = {}
        self.jobs: list[tuple[str, str]] = []  # (split, teacher name) per predict dataloader
        self._writers: dict[int, CacheWriter] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def spec(self, trainer: L.Trainer, pl_module: L.LightningModule) -> CacheSpec:
        data = trainer.datamodule
        template = data.chat_template
        return CacheSpec(
            scheme=pl_module.scheme,
            k=pl_module.k,
            n_draws=pl_module.num_draws,
            teachers=[pl_module.identity(i) for i in range(len(pl_module.teachers))],
            tokenizer_hash=tokenizer_hash(data.tokenizer),
            vocab_size=pl_module.vocab_size,
            temperature=pl_module.temperature,
            template=template.source if template else "",
            max_seq_length=data.max_seq_length,
            value_bits=self.value_bits,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        data = trainer.datamodule
        for teacher in pl_module.teachers:
            if teacher.model is not None:
                check_same_vocabulary(
                    data.tokenizer, AutoTokenizer.from_pretrained(teacher.model), teacher.key
                )
        spec = self.spec(trainer, pl_module)
        splits = {"train": data.train, "val": data.val}
        if trainer.is_global_zero:
            for split, path in self.paths.items():
                cache = open_cache(path, spec, rebuild=self.rebuild)
                plan = cache.plan_sync([s.sha for s in splits[split]])
                dropped = cache.drop(plan.drop) if plan.drop else 0
                rank_zero_info(f"[distill] cache {path}: {plan} (dropped {dropped})")
        trainer.strategy.barrier("teacher-cache-sync")
        jobs, samples = [], []
        for split, path in self.paths.items():
            self.caches[split] = cache = open_cache(path, spec)
            plan = cache.plan_sync([s.sha for s in splits[split]])
            by_sha = {s.sha: s for s in splits[split]}
            for index, teacher in enumerate(pl_module.teachers):
                missing = [by_sha[sha] for sha in plan.to_collect[teacher.key]]
                if missing:
                    jobs.append((split, teacher.key, index))
                    samples.append(missing)
        # a teacher's jobs stay adjacent so it is loaded once
        order = sorted(range(len(jobs)), key=lambda j: jobs[j][2])
        self.jobs = [jobs[j][:2] for j in order]
        pl_module.job_teachers = [jobs[j][2] for j in order]
        data.predict_jobs = [samples[j] for j in order]
        trainer.predict_loop.return_predictions = False  # outputs go to disk, not into a list in memory

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._thread = threading.Thread(target=self._drain, name="teacher-cache-writer", daemon=True)
        self._thread.start()

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        if self._error is not None:
            raise RuntimeError("the teacher cache writer failed") from self._error
        self._queue.put((trainer.global_rank, dataloader_idx, prediction))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._queue.put(_DONE)
        if self._thread is not None:
            self._thread.join()
        pl_module.release()
        if self._error is not None:
            raise RuntimeError("the teacher cache writer failed") from self._error
        for split, cache in self.caches.items():
            rank_zero_info(f"[distill] cache {split}: {cache.stats()}")

    def _drain(self) -> None:
        try:
            while (item := self._queue.get()) is not _DONE:
                rank, job, outputs = item
                writer = self._writer(rank, job)
                writer.extend(
                    (
                        o.sha,
                        o.num_tokens,
                        SparseTargets(o.ids, o.logits, o.lse, o.sample_ids, o.sample_counts),
                    )
                    for o in outputs
                )
            for writer in self._writers.values():
                writer.close()
        except BaseException as error:  # surfaced in the main thread
            self._error = error
            while self._queue.get() is not _DONE:  # unblock the producer
                pass

    def _writer(self, rank: int, job: int) -> CacheWriter:
        if job not in self._writers:
            for earlier in self._writers.values():  # the previous job is complete: commit it now
                earlier.close()
            split, teacher = self.jobs[job]
            self._writers[job] = self.caches[split].writer(teacher, rank, commit_seconds=self.commit_seconds)
        return self._writers[job]
