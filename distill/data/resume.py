"""Training batches a killed fit resumes exactly: each epoch's order is a function of (seed, epoch), and
the loader's checkpointed state says how many batches of that epoch were already trained."""

from __future__ import annotations

import math
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def rank_and_world(trainer: Any) -> tuple[int, int]:
    """(global rank, world size) of a Trainer; (0, 1) outside one."""
    return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)


def trained_position(trainer: Any) -> tuple[int, int]:
    """(epoch, batches of it already trained) from Lightning's loop state; (0, 0) outside a Trainer."""
    if trainer is None:
        return 0, 0
    loop = trainer.fit_loop
    return loop.epoch_progress.current.completed, loop.epoch_loop.batch_progress.current.ready


def trained_batches(trainer: Any) -> int:
    """Batches trained by the fit over all its epochs, restored with the loop's state on a resume; 0
    outside a Trainer."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready if trainer is not None else 0


def epoch_rng(seed: int, epoch: int) -> random.Random:
    """The generator of one epoch's order: the same on every run, rank and worker."""
    return random.Random(seed * 1_000_003 + epoch)


def yields(index: int, skip: int) -> bool:
    """Whether this DataLoader worker (or the main process) produces batch ``index`` of the epoch.

    Batches after the first ``skip`` are dealt round-robin from worker 0, the worker the DataLoader
    reads first, so the batches arrive in order whatever ``skip`` is.
    """
    worker = get_worker_info()
    workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
    return index >= skip and (index - skip) % workers == worker_id


@dataclass
class Part:
    """``size`` consecutive batches of an epoch. ``open()`` enters what building them needs (a chunk's
    teacher targets collected, a round sampled) and gives the function that builds batch i of them; its
    exit (a purge) runs when they are done and when the epoch is cut short and its stream closed."""

    size: int
    open: Callable[[], AbstractContextManager[Callable[[int], Any]]]


class ResumableStream(IterableDataset):
    """One epoch of this rank's batches, in parts, the same on every run for a given epoch.

    ``ResumableLoader`` sets ``epoch`` and ``skip`` (the batches of it trained before a resume) before
    each epoch: a part whose batches were all trained is passed over without being opened. With
    DataLoader workers, each produces the batches ``yields`` deals it.
    """

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def parts(self, epoch: int) -> list[Part]:
        raise NotImplementedError

    def __len__(self) -> int:
        return sum(part.size for part in self.parts(self.epoch))

    def __iter__(self) -> Iterator[Any]:
        index = 0
        for part in self.parts(self.epoch):
            if not part.size or index + part.size <= self.skip:
                index += part.size
                continue
            with part.open() as build:
                for number in range(part.size):
                    if yields(index, self.skip):
                        yield build(number)
                    index += 1


class ShuffledBatches(ResumableStream):
    """One epoch of collated batches of ``rows`` (samples, or packed rows of samples) in a per-epoch order.

    The rows are permuted from (seed, epoch); rank r takes every world-th of them, all ranks the same
    count (DDP needs equal steps), and cuts its share into batches.
    """

    def __init__(
        self,
        rows: Sequence[Any],
        collate: Callable[[list[Any]], Any],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(batch_size, rank, world_size)
        self.rows = rows
        self.collate = collate
        self.seed = seed

    @property
    def rows_per_rank(self) -> int:
        return len(self.rows) // self.world_size

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of the epoch, as row indices."""
        order = list(range(len(self.rows)))
        epoch_rng(self.seed, epoch).shuffle(order)
        mine = order[self.rank :: self.world_size][: self.rows_per_rank]
        return [mine[b : b + self.batch_size] for b in range(0, len(mine), self.batch_size)]

    def parts(self, epoch: int) -> list[Part]:
        batches = self.batches(epoch)

        def build(number: int) -> Any:
            return self.collate([self.rows[row] for row in batches[number]])

        return [Part(len(batches), lambda: nullcontext(build))]

    def __len__(self) -> int:
        return math.ceil(self.rows_per_rank / self.batch_size)


class ResumableLoader(DataLoader):
    """A DataLoader over a ``ResumableStream`` that Lightning checkpoints (it has ``state_dict``): the
    epoch and the batches of it already trained, so a resumed fit continues at the next batch."""

    def __init__(
        self, stream: ResumableStream, progress: Callable[[], tuple[int, int]], **kwargs: Any
    ) -> None:
        """``progress()``: (epoch, batches of it trained so far), read from the fit loop."""
        super().__init__(stream, batch_size=None, worker_init_fn=leave_sigterm_to_main, **kwargs)
        self.progress = progress
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

    def __iter__(self):
        epoch, _ = self.progress()
        self.dataset.epoch = epoch
        self.dataset.skip = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            if self._resume["batches"] >= len(self.dataset):
                # saved after the epoch's last batch: Lightning's restart counts that epoch done and trains
                # the next one from this iterator (its epoch counter is epoch + 1 from then on)
                self.dataset.epoch = epoch + 1
                rank_zero_info(f"[distill] epoch {epoch} was complete: resuming at epoch {epoch + 1}")
            else:
                self.dataset.skip = self._resume["batches"]
                rank_zero_info(f"[distill] resuming epoch {epoch} after {self.dataset.skip} batches")
        self._resume = None
        return super().__iter__()


def leave_sigterm_to_main(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGTERM and leaves the stop to the main process
    (``distill.callbacks.PreemptionCheckpoint`` saves, then ends its workers). PyTorch's own worker
    handler dies of a SIGTERM sent to every process of the job (SLURM), and the fit with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
