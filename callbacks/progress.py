"""Progress of Lightning's loops (fit, validate, predict) a user can follow: a tqdm bar on a terminal,
plain lines in a log file (SLURM, ``> log.txt``), where a bar's carriage returns show nothing till the end."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning as L
from distill.callbacks.steps import OptimizerSteps
from lightning.pytorch.callbacks import TQDMProgressBar

from distill.data.batch import TokenBatch
from distill.data.encoding import IGNORE_INDEX
from distill.progress import format_seconds
from distill.train.student import step_batch

# a step-limited fit's bar: its description ("step 120/500: ") already counts the steps
STEP_BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


def by_steps(trainer: L.Trainer) -> bool:
    """Whether ``max_steps`` alone ends the fit (``max_epochs`` unset or -1)."""
    return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


def position(trainer: L.Trainer) -> str:
    """``step 120/500`` in a fit that ``max_steps`` ends, else ``epoch 2/3`` (``epoch 2`` if unbounded)."""
    if by_steps(trainer):
        return f"step {trainer.global_step}/{trainer.max_steps}"
    bounded = trainer.max_epochs not in (None, -1)
    return f"epoch {trainer.current_epoch + 1}" + (f"/{trainer.max_epochs}" if bounded else "")


def share(done: int, total: float, percent: bool = True) -> str:
    """``120/500 (24%)``, or ``120`` when the total is unknown."""
    if not 0 < total < math.inf:
        return f"{done:,}"
    return f"{done:,}/{int(total):,}" + (f" ({100 * done / total:.0f}%)" if percent else "")


def eta(done: int, total: float, seconds: float) -> str:
    if done <= 0 or not 0 < total < math.inf:
        return "ETA ?"
    return f"ETA {format_seconds(max(total - done, 0) * seconds / done)}"


class LoopProgress(TQDMProgressBar):
    """Every run's progress (``python -m distill`` adds it; its options are under ``progress``; README,
    "Use", says what it shows): Lightning's tqdm bar on a terminal, one bar over the steps of a fit that
    ``max_steps`` ends; elsewhere plain lines on stderr. Tokens/s are of all ranks, estimated from rank 0's
    batches.
    """

    def __init__(
        self,
        every_n_steps: int | None = 50,
        every_seconds: float | None = 30.0,
        lines: bool | None = None,
        metrics: tuple[str, ...] = ("loss", "kd", "ce"),
        refresh_rate: int = 1,
    ) -> None:
        """
        Args:
            every_n_steps: A line at every multiple of this many optimizer steps (predict: batches).
            every_seconds: A line once this many seconds passed since the last one.
            lines: Plain lines (true) or a tqdm bar (false); default: lines where stdout is no terminal.
            metrics: The logged metrics (``train/<name>``, ``val/<name>``, ``test/<name>``) a line shows,
                where logged.
            refresh_rate: Batches between redraws of the tqdm bar.
        """
        if every_n_steps is None and every_seconds is None:
            raise ValueError("LoopProgress needs every_n_steps or every_seconds (or both) to print lines")
        if (every_n_steps is not None and every_n_steps < 1) or (
            every_seconds is not None and every_seconds <= 0
        ):
            raise ValueError(
                "LoopProgress every_n_steps and every_seconds must be positive, "
                f"not {every_n_steps} and {every_seconds}"
            )
        super().__init__(refresh_rate=refresh_rate)
        self.every_n_steps = every_n_steps
        self.every_seconds = every_seconds
        self.lines = lines
        self.metrics = tuple(metrics)
        self._plain = bool(lines)
        self._printed_step = self._start_step = 0
        self._steps = OptimizerSteps()
        self._reset_counts(0.0)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.lines is None:
            isatty = getattr(sys.stdout, "isatty", None)
            self._plain = not (isatty and isatty())

    @property
    def is_enabled(self) -> bool:
        """Whether the tqdm bars draw: on rank 0, in bar mode."""
        return super().is_enabled and not self._plain

    @property
    def prints_lines(self) -> bool:
        return super().is_enabled and self._plain

    @property
    def train_description(self) -> str:
        return position(self.trainer)

    # ---- the bar ----------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if not by_steps(trainer):
            super().on_train_epoch_start(trainer)
        else:
            bar = self.train_progress_bar
            if bar.total != trainer.max_steps:  # one bar over all the fit's epochs
                bar.reset(total=trainer.max_steps)
                bar.initial = bar.n = trainer.global_step  # resumed: the rate and ETA count from here
                bar.bar_format = STEP_BAR_FORMAT
        self.train_progress_bar.set_description(self.train_description)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not by_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        else:
            bar, step = self.train_progress_bar, trainer.global_step
            if self.is_enabled and step != bar.n and (step % self.refresh_rate == 0 or step == bar.total):
                bar.set_description(self.train_description, refresh=False)
                bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
                bar.n = step
                bar.refresh()
        if self.prints_lines:
            self._count(step_batch(outputs, batch))
            if self._steps.ended(trainer) and self._train_line_due(trainer):
                self._print_train_line(trainer, batch_idx)

    # ---- the lines --------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = time.monotonic()
        self._start_step = self._printed_step = trainer.global_step
        self._steps.start(trainer)
        total = trainer.estimated_stepping_batches  # an iterable dataset without max_steps: -1
        self._total_steps = total if total > 0 else math.inf
        self._reset_counts(self._start)

    def _train_line_due(self, trainer: L.Trainer) -> bool:
        return self._line_due(trainer.global_step, self._start_step + 1, self._total_steps)

    def _line_due(self, done: int, first: int, total: float) -> bool:
        """A line at the first step (or batch), the last, every ``every_n_steps`` and ``every_seconds``."""
        every = self.every_n_steps
        return (
            done == first
            or done >= total
            or (every is not None and done % every == 0)
            or self._seconds_due(self._line_time)
        )

    def _print_train_line(self, trainer: L.Trainer, batch_idx: int) -> None:
        now, step = time.monotonic(), trainer.global_step
        where = f"step {share(step, self._total_steps)}"
        if not by_steps(trainer):
            batches = share(batch_idx + 1, self.total_train_batches, percent=False)
            where = f"{position(trainer)} batch {batches}, {where}"
        parts = [where, *self._metric_parts(trainer, "train/")]
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        parts += self._rate_parts(trainer, now, predicting=False)
        elapsed = now - self._start
        parts += [
            f"elapsed {format_seconds(elapsed)}",
            eta(step - self._start_step, self._total_steps - self._start_step, elapsed),
        ]
        self._write(parts)
        self._printed_step = step
        self._reset_counts(now)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.prints_lines and trainer.global_step != self._printed_step:  # stopped between lines
            self._print_train_line(trainer, trainer.fit_loop.epoch_loop.batch_idx)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._eval_start = self._eval_line_time = time.monotonic()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.prints_lines and not trainer.sanity_checking and self._seconds_due(self._eval_line_time):
            self._eval_line_time = now = time.monotonic()
            batches = share(batch_idx + 1, self.total_val_batches_current_dataloader)
            self._write([f"validation batch {batches}", f"elapsed {format_seconds(now - self._eval_start)}"])

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self.prints_lines or trainer.sanity_checking:
            return
        seconds = time.monotonic() - self._eval_start
        self._paused += seconds  # not training time: the next line's tokens/s leave it out
        where = f"validation at step {trainer.global_step}" if trainer.state.fn == "fit" else "validation"
        self._write([where, *self._metric_parts(trainer, "val/"), f"took {format_seconds(seconds)}"])

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._eval_start = time.monotonic()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        if self.prints_lines:
            parts = ["test", *self._metric_parts(trainer, "test/")]
            self._write([*parts, f"took {format_seconds(time.monotonic() - self._eval_start)}"])

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._start = time.monotonic()
        self._reset_counts(self._start)

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if not self.prints_lines:
            return
        self._count(batch)
        batches = trainer.num_predict_batches
        done, total = sum(batches[:dataloader_idx]) + batch_idx + 1, sum(batches)
        if self._line_due(done, 1, total):
            now = time.monotonic()
            elapsed = now - self._start
            where = f"predict batch {share(done, total)}"
            where += f", dataloader {dataloader_idx + 1}/{len(batches)}" if len(batches) > 1 else ""
            parts = [where, *self._rate_parts(trainer, now, predicting=True)]
            self._write([*parts, f"elapsed {format_seconds(elapsed)}", eta(done, total, elapsed)])
            self._reset_counts(now)

    # ---- helpers ----------------------------------------------------------------------------------

    def _reset_counts(self, now: float) -> None:
        """Start a new interval between two lines."""
        self._line_time = now
        self._paused = 0.0
        self._samples = self._tokens = 0
        self._trained: Any = 0  # a device tensor once counted: read (synchronising) only in a line

    def _count(self, batch: Any) -> None:
        if not isinstance(batch, TokenBatch):
            return
        ids = batch.input_ids
        self._samples += ids.shape[0]
        self._tokens += ids.numel()
        # position t is trained on label t + 1, as StudentModule.compute_loss
        self._trained = self._trained + (batch.labels[:, 1:] != IGNORE_INDEX).sum()

    def _seconds_due(self, since: float) -> bool:
        return self.every_seconds is not None and time.monotonic() - since >= self.every_seconds

    def _metric_parts(self, trainer: L.Trainer, prefix: str) -> list[str]:
        logged = trainer.progress_bar_metrics
        return [
            f"{name} {float(logged[prefix + name]):.4g}" for name in self.metrics if prefix + name in logged
        ]

    def _rate_parts(self, trainer: L.Trainer, now: float, predicting: bool) -> list[str]:
        if not self._tokens:
            return []
        seconds = max(now - self._line_time - self._paused, 1e-9)
        scale = trainer.world_size / seconds
        parts = [f"{self._samples * scale:,.1f} samples/s"] if predicting else []
        tokens = f"{self._tokens * scale:,.0f} tokens/s"
        if not isinstance(self._trained, int):
            tokens += f" ({int(self._trained) * scale:,.0f} {'with labels' if predicting else 'trained'})"
        return [*parts, tokens]

    def _write(self, parts: list[str]) -> None:
        # on stderr with distill's other messages; flushed, so that it reaches a log file when printed
        print("[distill] " + ", ".join(parts), file=sys.stderr, flush=True)
