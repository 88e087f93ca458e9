"""Learning-rate schedules, injected into ``StudentModule`` by class path: any scheduler class whose first
two arguments are the optimizer and the run's optimizer steps (``trainer.estimated_stepping_batches``,
known once the trainer has its data): ``WarmupDecay`` (the default), torch's ``CosineAnnealingLR``, ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from distill.ranges import require

SchedulerCallable = Callable[[Optimizer, int], LRScheduler]
"""``(optimizer, total_steps) -> scheduler``: what ``StudentModule(scheduler=...)`` takes."""

Decay = Literal["linear", "cosine", "constant"]


class WarmupDecay(LambdaLR):
    """Linear warmup from 0 to the optimizer's learning rate, then ``decay`` until the run's last step,
    stepped once per optimizer step: Hugging Face's ``get_scheduler`` ``cosine``, ``linear`` and
    ``constant_with_warmup``, step for step."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        decay: Decay = "cosine",
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
    ) -> None:
        """
        Args:
            optimizer: The optimizer to schedule (given by the module).
            total_steps: The run's optimizer steps (given by the module).
            decay: After warmup: ``cosine`` (half a cosine down to 0), ``linear`` (down to 0) or
                ``constant``.
            warmup_steps: Linear warmup steps from 0 to the optimizer's learning rate.
            warmup_ratio: Warmup as a share of the run's optimizer steps instead (``warmup_steps`` unset).
        """
        require("model.scheduler.warmup_steps", warmup_steps, at_least=0)
        if warmup_steps and warmup_ratio:
            raise ValueError(
                "model.scheduler.warmup_steps and model.scheduler.warmup_ratio both set: set one of them"
            )
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(
                f"model.scheduler.warmup_ratio is a share of the run's steps, in [0, 1): got {warmup_ratio}"
            )
        warmup = warmup_steps or round(warmup_ratio * total_steps)
        # a functools.partial, as transformers' schedules: LambdaLR checkpoints it as an empty state
        super().__init__(optimizer, partial(_FACTORS[decay], warmup=warmup, total=total_steps))


# the factors keep transformers' arithmetic, so a run's learning rates are the same floats as with it


def _warming(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _cosine(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warming(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warming(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _constant(step: int, *, warmup: int, total: int) -> float:
    return _warming(step, warmup) if step < warmup else 1.0


_FACTORS: dict[str, Callable[..., float]] = {"cosine": _cosine, "linear": _linear, "constant": _constant}
