"""Teacher collection pieces shared by ``predict`` (the cache-writer callback) and ``fit`` (KD data module).

Both paths check the vocabularies, describe the run as a ``CacheSpec``, and then, holding each cache's
writer lock, sync the caches with the data, run ``TeacherModule`` on the samples each teacher lacks and
write its outputs on a background thread. A second run on the same caches waits for the lock and then
plans again, so it collects nothing twice. Syncing never drops samples that this run's data lacks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from distill.cache import CacheSpec, CacheWriter, SyncPlan, TeacherCache, WriterLock, open_cache
from distill.data.batch import to_device
from distill.data.batching import Collator
from distill.data.datamodule import DataModule
from distill.data.encoding import Encoded
from distill.data.templates import ChatTemplate
from distill.progress import Progress
from distill.teacher.identity import check_teacher_vocabulary, tokenizer_hash
from distill.teacher.module import TeacherModule
from distill.teacher.sparse import SparseOutput

_DONE = object()


def check_vocabularies(teacher: TeacherModule, tokenizer: PreTrainedTokenizerBase) -> None:
    """Every teacher maps tokens to the student's ids and has a row for each: fails before any model is
    loaded."""
    for index, t in enumerate(teacher.teachers):  # one of another tokenizer: its model against its own
        own = tokenizer if t.tokenizer is None else teacher.teacher_tokenizer(index)
        check_teacher_vocabulary(own, t.model, t.model_config, t.key)


def cache_spec(
    teacher: TeacherModule,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | None,
    max_seq_length: int,
    value_bits: int,
    labels: str = "",
) -> CacheSpec:
    """Everything that makes cached targets valid for a run; a cache with other values is stale.

    ``labels`` describes what makes a position trainable (see ``label_policy``)."""
    kept = teacher.sparsity
    if any(t.tokenizer is not None for t in teacher.teachers):
        return teacher_terms_spec(teacher, template, value_bits)
    return CacheSpec(
        scheme=kept.scheme,
        k=kept.head,
        n_draws=kept.num_draws,
        teachers=[teacher.identity(i) for i in range(len(teacher.teachers))],
        tokenizer_hash=tokenizer_hash(tokenizer),
        vocab_size=teacher.vocab_size,
        temperature=kept.draw_temperature,
        template=template.source if template else "",
        max_seq_length=max_seq_length,
        labels=labels,
        value_bits=value_bits,
    )


def teacher_terms_spec(teacher: TeacherModule, template: ChatTemplate | None, value_bits: int) -> CacheSpec:
    """The spec of a cache in the teachers' own terms (KD across tokenizers): their tokenizer, vocabulary
    and template, whole records (no student's length or truncation), so that students of any tokenizer
    share it. Its teachers must read alike: one tokenizer and one template."""
    kept, count = teacher.sparsity, len(teacher.teachers)
    keys = [t.key for t in teacher.teachers]
    if kept.scheme != "topk":
        raise ValueError(
            f"teachers {keys}: KD across tokenizers maps the teacher's exact top-k into the student's "
            f"vocabulary; sparsity.scheme {kept.scheme!r} cannot carry an unmapped share: use topk"
        )
    axes = [teacher.text_axis(i, template) for i in range(count) if teacher.teachers[i].tokenizer]
    tokenizers = {tokenizer_hash(teacher.teacher_tokenizer(i)) for i in range(count)}
    templates = {axis.template.source if axis.template else "" for axis in axes}
    if len(axes) != count or len(tokenizers) > 1 or len(templates) > 1:
        raise ValueError(
            f"teachers {keys}: a cache in a teacher's own terms holds teachers of one tokenizer and one "
            "template; give every teacher the same tokenizer and template, or distil in separate runs"
        )
    return CacheSpec(
        scheme=kept.scheme,
        k=kept.head,
        teachers=[teacher.identity(i) for i in range(count)],
        tokenizer_hash=tokenizers.pop(),
        vocab_size=len(teacher.teacher_tokenizer(0)),
        template=templates.pop(),
        labels="responses_only=True;whole records",
        value_bits=value_bits,
        teacher_terms=True,
    )


def label_policy(data: DataModule) -> str:
    """The data settings that decide which positions carry loss, hence which ones the cache holds."""
    return f"responses_only={data.train_on_responses_only};truncation={data.truncation}"


def writer_locks(paths: Iterable[Path], timeout: float | None = None) -> ExitStack:
    """The writer locks of several caches, taken in path order (two runs never wait on each other
    crosswise); released by closing the returned stack. Rank 0 takes them for all ranks."""
    stack = ExitStack()
    try:
        for path in sorted({Path(p) for p in paths}):
            stack.enter_context(WriterLock(path, timeout))
    except BaseException:
        stack.close()
        raise
    return stack


def sync_cache(
    path: str | Path, spec: CacheSpec, samples: Sequence[Encoded], rebuild: bool = False, prune: bool = False
) -> SyncPlan:
    """Open (or rebuild) a cache for ``spec``, delete what a killed writer left half-written, merge
    segments when they pile up or a sample is stored twice, and log what the sync keeps and collects.
    Cached samples this data lacks (a subset run, other files) are kept unless ``prune``; the log says
    how many and how to free them. Rank 0 only, holding the cache's writer lock."""
    cache = open_cache(path, spec, rebuild=rebuild)
    cache.remove_partials()  # no writer can be running: we hold the lock
    plan = cache.plan_sync([s.sha for s in samples])
    note = str(plan)
    if plan.absent and prune:
        note += f": pruned {cache.prune([s.sha for s in samples])}"
    elif plan.absent:
        note += f" (kept; to free them: `python -m distill cache prune {cache.path} --keep-data FILE...`)"
    merged = cache.tidy()
    if merged:
        note += f"; merged {merged} segments"
    rank_zero_info(f"[distill] cache {cache.path}: {note}")
    return plan


@dataclass
class Job:
    """One teacher's missing samples of one cache."""

    cache: TeacherCache
    teacher_index: int
    samples: list[Encoded]


def plan_jobs(
    teacher: TeacherModule,
    caches: Sequence[tuple[TeacherCache, list[Encoded]]],
    template: ChatTemplate | None = None,
) -> list[Job]:
    """The samples each teacher lacks in each cache, grouped by teacher so each is loaded once.

    ``template`` is the student's chat template, which teachers with a template of their own need
    (their samples are aligned by ``TeacherModule.prepare_jobs``): its absence fails here, before any
    teacher is loaded.
    """
    jobs = []
    for cache, samples in caches:
        plan = cache.plan_sync([s.sha for s in samples])
        by_sha = {s.sha: s for s in samples}
        for index, t in enumerate(teacher.teachers):
            missing = [by_sha[sha] for sha in plan.to_collect[t.key]]
            if missing:
                jobs.append(Job(cache, index, missing))
    jobs = sorted(jobs, key=lambda job: job.teacher_index)
    own = [j for j in jobs if teacher.teachers[j.teacher_index].template is not None]
    if template is None and any(
        s.record is not None and s.record.messages is not None for j in own for s in j.samples
    ):
        names = sorted({teacher.teachers[j.teacher_index].key for j in own})
        raise ValueError(
            f"teachers {names} have their own chat template: plan_jobs needs the student's (template=)"
        )
    return jobs


def job_list(jobs: Sequence[Job]) -> list[tuple[int, list[Encoded]]]:
    """(teacher index, samples) per job: what ``TeacherModule.prepare_jobs`` takes."""
    return [(job.teacher_index, job.samples) for job in jobs]


class BackgroundWriter:
    """Encodes and commits teacher outputs on a thread, so the next batch's forward overlaps the writing.

    ``put(job, outputs)`` hands over one batch; a new job commits and closes the previous job's writer.
    Errors on the thread surface in the caller at the next ``put`` or at ``close``.
    """

    def __init__(self, open_writer: Callable[[int], CacheWriter]) -> None:
        self.open_writer = open_writer
        self._writers: dict[int, CacheWriter] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="teacher-cache-writer", daemon=True)
        self._thread.start()

    def put(self, job: int, outputs: list[SparseOutput]) -> None:
        self._raise()
        self._queue.put((job, outputs))

    def close(self) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            # its message last, not only mid-traceback: a full disk says where and how much it needs
            raise RuntimeError(f"the teacher cache writer failed: {self._error}") from self._error

    def _drain(self) -> None:
        item = None
        try:
            while (item := self._queue.get()) is not _DONE:
                job, outputs = item
                if job not in self._writers:
                    for earlier in self._writers.values():  # the previous job is complete: commit it
                        earlier.close()
                    self._writers[job] = self.open_writer(job)
                self._writers[job].extend(
                    (
                        o.sha,
                        o.num_tokens,
                        o.targets,
                        getattr(o, "nll", float("nan")),
                        getattr(o, "spans", None),
                    )
                    for o in outputs
                )
            for writer in self._writers.values():
                writer.close()
        except BaseException as error:  # surfaced in the main thread
            self._error = error
            while item is not _DONE:  # unblock the producer (unless the final commits failed: it is done)
                item = self._queue.get()


def collect(
    teacher: TeacherModule,
    jobs: Sequence[Job],
    collator: Collator,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    commit_seconds: float = 30.0,
    template: ChatTemplate | None = None,
) -> int:
    """Run the teacher over each job's samples (its ``predict_step``, outside the predict loop) and write
    the outputs; frees the teacher afterwards. ``template``: the student's chat template. Returns the
    number of samples collected. Under the caches' writer locks (held by rank 0)."""
    if not jobs:
        return 0
    teacher.prepare_jobs(job_list(jobs), template)  # aligns own-template samples before any teacher loads
    teacher.to(device)
    writer = BackgroundWriter(
        lambda j: jobs[j].cache.writer(
            teacher.teachers[jobs[j].teacher_index].key, rank, commit_seconds=commit_seconds
        )
    )
    total = sum(len(job.samples) for job in jobs)
    progress = Progress(total, "collecting teacher targets", "samples", enabled=rank == 0)
    try:
        for j, job in enumerate(jobs):
            for start in range(0, len(job.samples), batch_size):
                batch = to_device(collator(job.samples[start : start + batch_size]), device)
                writer.put(j, teacher.predict_step(batch, start // batch_size, j))
                progress.update(len(batch.input_ids))
        progress.close()
    finally:
        writer.close()
        teacher.release()
    return total
