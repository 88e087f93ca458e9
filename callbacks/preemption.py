"""A fit stopped by its scheduler (SIGTERM, SLURM's pre-emption signal) saves where it is and says so."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(L.Callback):
    """On one of ``signals`` the fit finishes the optimizer step in flight, saves ``last.ckpt`` into the
    ModelCheckpoint's directory (so ``--ckpt_path last`` resumes it exactly) and exits with status
    128 + the signal's number (143 for SIGTERM), so a scheduler knows the job did not finish.

    Lightning alone stops after the micro-batch in flight (amid gradient accumulation), saves nothing and
    exits 0. While training runs this callback owns the signals, Lightning's SLURM auto-requeue of
    SIGUSR1 included: a signal is only recorded, and acted on at the next optimizer-step boundary, on
    every rank at once. During the sanity check Lightning's own handling applies (nothing is trained yet;
    ``python -m distill`` then exits 143 as well).
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")) -> None:
        """
        Args:
            signals: Signal names that stop the fit; SLURM sends SIGUSR1 ahead of the time limit
                with ``#SBATCH --signal=USR1@90``.
        """
        unknown = [name for name in signals if name not in signal.Signals.__members__]
        if unknown:
            raise ValueError(f"unknown signal names {unknown}; use names such as SIGTERM, SIGUSR1")
        self.signals = [signal.Signals[name] for name in signals]
        self._received = 0
        self._stop_code: int | None = None
        self._before_fit: dict[int, Any] = {}
        self._over: dict[int, Any] = {}
        self._step_at_batch_start = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Take the signals before any DataLoader worker starts: a worker inherits the handler, and one
        with the default handler dies of SLURM's SIGUSR1 (sent to every process of the job), the fit
        with it."""
        self._received, self._stop_code, self._over = 0, None, {}
        if stage == "fit" and _main_thread():
            self._before_fit = {signum: signal.signal(signum, self._record) for signum in self.signals}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _main_thread():  # take SIGTERM back from Lightning, which set its own handler since
            for signum in self.signals:
                signal.signal(signum, self._record)

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
        if signum not in self._over:
            self._received = signum
            return
        # the fit is over but this handler was put back: do what the handler from before the fit does
        previous = self._over[signum]
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop_if_saved()
        self._step_at_batch_start = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()  # no validation of a pre-empted run

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # amid gradient accumulation: a checkpoint would lose the accumulated gradients
        signum = self._received
        if trainer.world_size > 1:  # one rank's signal stops all: the checkpoint is a collective
            received = torch.tensor(signum, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(received, reduce_op="max"))
        if not signum:
            return
        path, found_by_last = self._checkpoint_path(trainer)
        if trainer.is_global_zero and path.is_symlink():  # save_last="link": keep its target intact
            path.unlink()
        trainer.strategy.barrier("preemption-checkpoint")
        trainer.save_checkpoint(path)
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


def _main_thread() -> bool:
    """Only the main thread may set signal handlers."""
    return threading.current_thread() is threading.main_thread()
