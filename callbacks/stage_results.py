"""Results files in the layout Hugging Face Trainer users know (MedicalGPT's output directories):
``train_results.json``, ``eval_results.json`` and ``trainer_state.json`` with its ``log_history``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from distill.callbacks.hf_export import untrained_reason
from distill.callbacks.steps import OptimizerSteps

from distill.data.batch import TokenBatch, UnitBatch
from distill.train.student import step_batch


class StageResults(L.Callback):
    """Writes ``train_results.json`` at the end of a fit, ``eval_results.json`` after each validation
    outside a fit and ``trainer_state.json`` at each checkpoint, after each validation in the fit and at
    the end (docs/pipeline.md lists their fields). The history and the running totals are kept in
    checkpoints, so a resumed fit reports the whole run, and a fit resumed at its end the run it completes.
    """

    def __init__(self, dirpath: str) -> None:
        """
        Args:
            dirpath: Directory of the three files (a pipeline stage's directory).
        """
        self.dirpath = Path(dirpath)
        self.log_history: list[dict[str, Any]] = []
        self.totals = {"seconds": 0.0, "samples": 0, "tokens": 0, "loss_sum": 0.0, "batches": 0}
        self._window = {"loss_sum": 0.0, "batches": 0}
        self._started: float | None = None  # while training runs: when it (re)started
        self._step = 0  # the optimizer steps taken when a checkpoint saves this state
        self._steps = OptimizerSteps()
        self._eval = {"started": 0.0, "samples": 0, "tokens": 0}

    def state_dict(self) -> dict[str, Any]:
        return {"log_history": self.log_history, "totals": self._totals_now(), "step": self._step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.log_history = list(state_dict["log_history"])
        self.totals.update(state_dict["totals"])
        if "step" in state_dict:
            self.log_history += self._validation_after_checkpoint(state_dict["step"])

    def _validation_after_checkpoint(self, step: int) -> list[dict[str, Any]]:
        """The validation that ran at the checkpoint's own step, after the checkpoint was saved (a
        ``ModelCheckpoint`` saves at the step's end, before its validation), as ``trainer_state.json``
        kept it: a resumed fit does not run that validation again."""
        try:
            written = json.loads((self.dirpath / "trainer_state.json").read_text())["log_history"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        kept = {json.dumps(entry, sort_keys=True) for entry in self.log_history}
        return [
            entry
            for entry in written
            if isinstance(entry, dict)
            and entry.get("step") == step
            and "eval_runtime" in entry
            and json.dumps(entry, sort_keys=True) not in kept
        ]

    def _totals_now(self) -> dict[str, Any]:
        """The running totals, the training time so far included."""
        elapsed = time.monotonic() - self._started if self._started is not None else 0.0
        return {**self.totals, "seconds": self.totals["seconds"] + elapsed}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()
        self._step = trainer.global_step
        self._steps.start(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a fit resumed at its end trains nothing and calls neither this nor on_train_start
        self.totals = self._totals_now()
        self._started = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rows, tokens = batch_size(step_batch(outputs, batch))
        self.totals["samples"] += rows
        self.totals["tokens"] += tokens
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            for totals in (self.totals, self._window):
                totals["loss_sum"] += float(loss)
                totals["batches"] += 1
        self._step = trainer.global_step
        stepped = self._steps.ended(trainer)
        if stepped and trainer.global_step % trainer.log_every_n_steps == 0 and self._window["batches"]:
            self.log_history.append(
                {
                    "step": trainer.global_step,
                    "epoch": trainer.current_epoch,
                    "loss": self._window["loss_sum"] / self._window["batches"],
                    "learning_rate": trainer.optimizers[0].param_groups[0]["lr"],
                }
            )
            self._window = {"loss_sum": 0.0, "batches": 0}

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval = {"started": time.monotonic(), "samples": 0, "tokens": 0}

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        rows, tokens = batch_size(step_batch(outputs, batch))
        self._eval["samples"] += rows
        self._eval["tokens"] += tokens

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        seconds = time.monotonic() - self._eval["started"]
        samples, tokens = reduced(trainer, self._eval["samples"], self._eval["tokens"])
        results = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        results.update(eval_metrics(trainer.callback_metrics))
        results.update(
            eval_runtime=seconds,
            eval_samples=samples,
            eval_samples_per_second=samples / max(seconds, 1e-9),
            eval_tokens_per_second=tokens / max(seconds, 1e-9),
        )
        if trainer.state.fn == "fit":
            self.log_history.append(results)
            if trainer.is_global_zero:  # kept on disk for a resume from this step's checkpoint
                write_json(self.dirpath / "trainer_state.json", self.trainer_state(trainer))
        elif trainer.is_global_zero:
            write_json(self.dirpath / "eval_results.json", results)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            write_json(self.dirpath / "trainer_state.json", self.trainer_state(trainer))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        samples, tokens = reduced(trainer, self.totals["samples"], self.totals["tokens"])
        if untrained_reason(trainer) is not None or not trainer.is_global_zero:
            return
        seconds = max(self.totals["seconds"], 1e-9)
        write_json(
            self.dirpath / "train_results.json",
            {
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "train_loss": self.totals["loss_sum"] / max(self.totals["batches"], 1),
                "train_runtime": self.totals["seconds"],
                "train_samples": samples,
                "train_samples_per_second": samples / seconds,
                "train_steps_per_second": trainer.global_step / seconds,
                "train_tokens_per_second": tokens / seconds,
            },
        )
        write_json(self.dirpath / "trainer_state.json", self.trainer_state(trainer))

    def trainer_state(self, trainer: L.Trainer) -> dict[str, Any]:
        return {
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "max_steps": trainer.max_steps,
            "logging_steps": trainer.log_every_n_steps,
            "log_history": self.log_history,
        }


def batch_size(batch: TokenBatch) -> tuple[int, int]:
    """Samples (preference pairs and KTO samples as units; an RL batch's completions; a packed row counts
    once) and non-padding tokens of a batch."""
    ids, mask = batch.input_ids, batch.attention_mask
    tokens = int(mask.sum()) if mask is not None else ids.numel()
    if isinstance(batch, UnitBatch):  # a unit is a pair (or a KTO sample)
        return len(batch.sequence_shas) // batch.unit_size, tokens
    return ids.shape[0], tokens


def reduced(trainer: L.Trainer, *counts: int) -> list[int]:
    """Counts summed over the ranks (every rank must call it)."""
    if trainer.world_size == 1:
        return list(counts)
    total = trainer.strategy.reduce(
        torch.tensor(counts, dtype=torch.float64, device=trainer.strategy.root_device), reduce_op="sum"
    )
    return [int(x) for x in total.tolist()]


def eval_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """``val/loss`` -> ``eval_loss``, ``val/ppl`` -> ``perplexity``, ``val/acc`` -> ``eval_accuracy``, any
    other ``val/x/y`` -> ``eval_x_y``."""
    renamed = {"loss": "eval_loss", "ppl": "perplexity", "acc": "eval_accuracy"}
    results = {}
    for key, value in metrics.items():
        if key.startswith("val/"):
            name = key.removeprefix("val/")
            results[renamed.get(name, "eval_" + name.replace("/", "_"))] = float(value)
    return results


def write_json(path: Path, values: dict[str, Any]) -> None:
    """Written beside and renamed into place: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(values, indent=2) + "\n")
    partial.replace(path)
