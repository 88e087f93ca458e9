"""A fit stopped by its scheduler (SIGTERM, SLURM's pre-emption signal) saves where it is and says so."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from distill.callbacks.steps import OptimizerSteps
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from distill.cache.segment import fsync_path


class PreemptionCheckpoint(L.Callback):
    """On one of ``signals`` the fit finishes the optimizer step in flight, saves ``last.ckpt`` into the
    ModelCheckpoint's directory and exits 128 + the signal's number (README, "Use", has the rules).

    Lightning alone stops after the micro-batch in flight (amid gradient accumulation), saves nothing and
    exits 0. While training runs this callback owns the signals, Lightning's SLURM auto-requeue of
    SIGUSR1 included: a signal is only recorded, and acted on at the next optimizer-step boundary, on
    every rank at once. Ctrl-C before the first training step or after the last, or a second Ctrl-C,
    stops at once; a signal the process was started ignoring stays ignored; DataLoader workers leave
    every stop to the main process. During the sanity check Lightning's own handling applies.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT")) -> None:
        """
        Args:
            signals: Signal names that stop the fit; SLURM sends SIGUSR1 ahead of the time limit
                with ``#SBATCH --signal=USR1@90``, a terminal's Ctrl-C sends SIGINT.
        """
        unknown = [name for name in signals if name not in signal.Signals.__members__]
        if unknown:
            raise ValueError(f"unknown signal names {unknown}; use names such as SIGTERM, SIGUSR1")
        self.signals = [signal.Signals[name] for name in signals]
        self._received = 0
        self._stop_code: int | None = None
        self._before_fit: dict[int, Any] = {}
        self._over: dict[int, Any] = {}
        self._steps = OptimizerSteps()
        self._training = False  # a training step may have run: there is something to save
        self._pid = -1  # the process that set the handlers; DataLoader workers forked from it inherit them
        self._rank_zero = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Take the signals before any DataLoader worker starts: a worker inherits the handler, and one
        with the default handler dies of SLURM's SIGUSR1 (sent to every process of the job), the fit
        with it."""
        self._received, self._stop_code, self._over, self._training = 0, None, {}, False
        self._pid, self._rank_zero = os.getpid(), trainer.is_global_zero
        if stage == "fit" and _main_thread():
            taken = [signum for signum in self.signals if signal.getsignal(signum) != signal.SIG_IGN]
            self._before_fit = {signum: signal.signal(signum, self._record) for signum in taken}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = True
        self._steps.start(trainer)
        if _main_thread():  # take SIGTERM back from Lightning, which set its own handler since
            for signum in self._before_fit:
                signal.signal(signum, self._record)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = False  # a Ctrl-C during what follows (an export) interrupts it

    def on_exception(self, trainer: L.Trainer, *args: Any) -> None:
        self._restore()  # Lightning then puts back the handlers it found (ours): see _record

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._before_fit.items():
            signal.signal(signum, handler)
        if self._before_fit:
            self._over, self._before_fit = self._before_fit, {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # a DataLoader worker (Ctrl-C reaches the terminal's whole process group): the main process
            # stops the fit and then ends its workers; one that died first would fail the fit
            return
        if signum in self._over:
            # the fit is over but this handler was put back: do what the handler from before the fit does
            previous = self._over[signum]
            signal.signal(signum, previous)
            _act_as(previous, signum, frame)
        elif signum == signal.SIGINT and (not self._training or self._received == signum):
            # nothing trained yet, or a second Ctrl-C: the usual KeyboardInterrupt, now
            _act_as(self._before_fit.get(signum, signal.default_int_handler), signum, frame)
        else:
            if signum == signal.SIGINT and self._rank_zero:  # os.write: print may not run in a handler
                os.write(
                    2,
                    b"\n[distill] SIGINT: saving last.ckpt after this optimizer step; Ctrl-C again "
                    b"stops without saving\n",
                )
            self._received = signum

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop_if_saved()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()  # no validation of a pre-empted run

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._steps.ended(trainer):
            return  # amid gradient accumulation: a checkpoint would lose the accumulated gradients
        signum = self._received
        if trainer.world_size > 1:  # one rank's signal stops all: the checkpoint is a collective
            received = torch.tensor(signum, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(received, reduce_op="max"))
        if not signum:
            return
        path, found_by_last = self._checkpoint_path(trainer)
        _save_atomically(trainer, path)
        resume = "--ckpt_path last" if found_by_last else f"--ckpt_path {path}"
        name = signal.Signals(signum).name
        rank_zero_info(f"[distill] {name} at step {trainer.global_step}: saved {path}; resume with {resume}")
        # stopped at the next hook, once Lightning has logged this step; a fit that ends with this step
        # simply finishes
        self._stop_code = 128 + signum

    def _stop_if_saved(self) -> None:
        if self._stop_code is not None:
            raise SIGTERMException(self._stop_code)

    @staticmethod
    def _checkpoint_path(trainer: L.Trainer) -> tuple[Path, bool]:
        """``last.ckpt`` in the first ModelCheckpoint's directory, where ``--ckpt_path last`` looks (and
        whether it does look there: not without a ModelCheckpoint)."""
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / "last.ckpt", True
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt", False


def _save_atomically(trainer: L.Trainer, path: Path) -> None:
    """Save to a temporary name beside ``path``, fsync it and rename it over ``path``: whatever
    interrupts the write, ``path`` is the previous checkpoint or the new one, whole. (Lightning's writer
    stages a file in the system's temp directory and, where that is another file system, such as a
    node-local /tmp with checkpoints on shared storage, copies it over the target in place.) Renaming
    also replaces a ``save_last="link"`` symlink rather than writing through it into its target.

    A sharded checkpoint (a directory: DeepSpeed, FSDP) cannot replace a directory in one rename: the
    old one is renamed aside first and deleted after, so a kill between the two renames leaves it as
    ``.last.ckpt.old``."""
    # no "last*.ckpt" name: ModelCheckpoint takes any such file for a resume point
    partial = path.with_name(f".{path.name}.partial")
    if trainer.is_global_zero:
        _remove(partial)  # what a save killed earlier left
    trainer.strategy.barrier("preemption-checkpoint")
    try:
        trainer.save_checkpoint(partial)  # a collective under sharding: every rank writes its part
    except BaseException:
        if trainer.is_global_zero:
            _remove(partial)
        raise
    if trainer.is_global_zero:
        _fsync_tree(partial)
        if partial.is_dir() and path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(partial, path)
            _remove(old)
        else:
            if partial.is_dir() or path.is_dir():  # a rename cannot put a directory over a file or back
                _remove(path)
            os.replace(partial, path)
        fsync_path(path.parent)
    trainer.strategy.barrier("preemption-checkpoint-saved")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a directory and the directories: a rename only keeps what is on
    disk when the machine goes down."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        fsync_path(p)


def _act_as(handler: Any, signum: int, frame: FrameType | None) -> None:
    """Do what ``handler`` (a handler from ``signal.signal``) does with the signal."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _main_thread() -> bool:
    """Only the main thread may set signal handlers."""
    return threading.current_thread() is threading.main_thread()
