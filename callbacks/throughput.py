"""Lightning's ThroughputMonitor, told how to count the tokens of a distill batch."""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def _rows(batch: dict) -> int:
    return batch["input_ids"].shape[0]


def _tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


class TokenThroughput(ThroughputMonitor):
    """Logs samples/s and tokens/s (``train/device/items_per_sec``, padding included) with no per-config
    lambdas, and FLOPs/s from the module's ``flops_per_batch`` (StudentModule counts each batch's:
    ``distill.train.flops``); MFU (``train/device/mfu``) on GPUs whose peak Lightning knows."""

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, window_size=window_size)
