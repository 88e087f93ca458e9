"""Callbacks that tests load by class path into subprocess runs (``tests.probes.RankProbe``)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L


class RankProbe(L.Callback):
    """Writes what each process believes about its place in the job to ``directory/rank{global}.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer.strategy.cluster_environment
        facts = {
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "environment": type(env).__name__,
            "main_address": env.main_address,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))


class KillAt(L.Callback):
    """SIGKILLs the process when a training batch starts at ``step``: as a crash, no cleanup runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
