"""Every N steps, a few training prompts with their sampled completions and rewards, for reading what
an RL objective (``GRPO``, ``RLOO``) is teaching: a W&B table under a ``WandbLogger``, else lines of
``completions.jsonl`` in the logger's directory (CSV, TensorBoard) or the trainer's root."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from distill.callbacks.steps import OptimizerSteps
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


class CompletionLog(L.Callback):
    def __init__(self, every_n_steps: int = 50, num_completions: int = 4) -> None:
        """
        Args:
            every_n_steps: Optimizer steps between two logs (the first after step 1).
            num_completions: Completions logged each time (of the latest rollout, in order).
        """
        if every_n_steps < 1 or num_completions < 1:
            raise ValueError("every_n_steps and num_completions must be at least 1")
        self.every_n_steps = every_n_steps
        self.num_completions = num_completions
        self._steps = OptimizerSteps()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps.start(trainer)

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        # once per logged optimizer step, not at each of its micro-batches
        if not self._steps.ended(trainer) or (step - 1) % self.every_n_steps:
            return
        rollouts = getattr(pl_module.objective, "rollouts", None)
        if rollouts is None or rollouts.last is None:
            return
        rows = completion_rows(rollouts.last, rollouts.names, step, self.num_completions)
        logger = trainer.logger
        if isinstance(logger, WandbLogger):
            columns = list(rows[0])
            logger.log_table("completions", columns=columns, data=[list(r.values()) for r in rows], step=step)
            return
        directory = Path(
            logger.log_dir if logger is not None and logger.log_dir else trainer.default_root_dir
        )
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "completions.jsonl", "a", encoding="utf-8") as file:
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def completion_rows(rollout, reward_names: list[str], step: int, count: int) -> list[dict]:
    """The first ``count`` completions of a rollout as flat rows (step, prompt, completion, rewards)."""
    rows = []
    for i in range(min(count, len(rollout.texts))):
        row = {"step": step, "prompt": rollout.prompts[i], "completion": rollout.texts[i]}
        row["reward"] = round(float(rollout.total[i]), 4)
        row.update({name: round(float(rollout.rewards[i, j]), 4) for j, name in enumerate(reward_names)})
        row["length"] = int(rollout.completions.lengths[i])
        row["stopped"] = bool(rollout.completions.stopped[i])
        rows.append(row)
    return rows
