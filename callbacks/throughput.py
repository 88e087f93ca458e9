"""Lightning's ThroughputMonitor, told how to count the tokens of a distill batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor

from distill.data.batch import TokenBatch
from distill.train.student import step_batch


def _rows(batch: TokenBatch) -> int:
    return batch.input_ids.shape[0]


def _tokens(batch: TokenBatch) -> int:
    return batch.input_ids.numel()


def _counting_step_batch(hook: Callable) -> Callable:
    """``hook`` given the batch the step ran on: an objective's prepared one (completion rows of prompts)."""

    def counted(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, *rest: Any):
        return hook(self, trainer, module, outputs, step_batch(outputs, batch), *rest)

    return counted


class TokenThroughput(ThroughputMonitor):
    """Logs samples/s and tokens/s (``train/device/items_per_sec``, padding included) with no per-config
    lambdas, and FLOPs/s from the module's ``flops_per_batch`` (StudentModule counts each batch's:
    ``distill.train.flops``); MFU (``train/device/mfu``) on GPUs whose peak Lightning knows."""

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, window_size=window_size)

    on_train_batch_end = _counting_step_batch(ThroughputMonitor.on_train_batch_end)
    on_validation_batch_end = _counting_step_batch(ThroughputMonitor.on_validation_batch_end)
    on_test_batch_end = _counting_step_batch(ThroughputMonitor.on_test_batch_end)
