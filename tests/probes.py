"""Callbacks that tests load by class path into subprocess runs (``tests.probes.RankProbe``)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy


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
    """SIGKILLs the process when a training batch starts at ``step``: as a crash, no cleanup runs. With
    ``once_marker``, only the first time (the file it creates marks that it has)."""

    def __init__(self, step: int, once_marker: str | None = None) -> None:
        self.step = step
        self.once_marker = Path(once_marker) if once_marker else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if trainer.global_step == self.step:
            if self.once_marker is not None:
                if self.once_marker.exists():
                    return
                self.once_marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtPredictBatch(L.Callback):
    """SIGKILLs the process when prediction batch ``batch`` starts (a collection killed midway: the
    batches before it committed, if the writer commits every batch)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx, *args) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class TermAt(L.Callback):
    """Sends ``signal_name`` to the process when a training batch starts at ``step``, as a scheduler
    pre-empting the job would (SIGTERM; SLURM's ``--signal=USR1@90`` sends SIGUSR1); with ``rank``, only
    to that rank's process; with ``children``, to its DataLoader workers too, as SLURM signals every
    process of the job."""

    def __init__(
        self, step: int, signal_name: str = "SIGTERM", rank: int | None = None, children: bool = False
    ) -> None:
        self.step = step
        self.signal = signal.Signals[signal_name]
        self.rank = rank
        self.children = children
        self.sent = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step == self.step and not self.sent:  # once, at the step's first micro-batch
            self.sent = True
            if self.children:
                workers = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()
                assert workers, "no DataLoader workers to signal: give the data num_workers > 0"
                for worker in workers:
                    os.kill(int(worker), self.signal)
            os.kill(os.getpid(), self.signal)


class TermInSanityCheck(L.Callback):
    """Sends SIGTERM to the process at the first batch of the sanity check, before any training."""

    def on_validation_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP on CPU processes (gloo), so tests can shard without a GPU; Lightning itself only
    accepts FSDP on CUDA, torch's FSDP needs ``device_id`` set to the CPU, and gathering the full state
    dict with ``offload_to_cpu`` (Lightning's choice, for GPUs) crashes when the shards are on the CPU."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )

    def lightning_module_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()


def vowel_share(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """A reward that differs between random completions (tests of RL runs on tiny random policies)."""
    return [sum(c in "aeiou" for c in text.lower()) / max(1, len(text)) for text in completions]


class PromptLog(L.Callback):
    """Appends the prompt SHAs of each training batch, and the rows they became, to
    ``directory/prompts{rank}.jsonl`` (which prompts each rank trained on, as whole groups)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args
    ) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        from distill.train.student import step_batch

        line = {"shas": batch.shas, "rows": int(step_batch(outputs, batch).input_ids.shape[0])}
        with open(self.directory / f"prompts{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(line) + "\n")
