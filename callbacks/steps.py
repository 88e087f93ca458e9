"""When an optimizer step just ended, for callbacks that act once per step rather than per micro-batch."""

from __future__ import annotations

import lightning as L


class OptimizerSteps:
    """Tells, in ``on_train_batch_end``, whether the micro-batch that just ended completed an optimizer
    step. Lightning calls that hook once per micro-batch; ``trainer.global_step`` counts the optimizer
    steps taken, so a step ended exactly when it moved since the last call. Unlike counting batches
    (``(batch_idx + 1) % accumulate_grad_batches``) this holds for the short last window of an epoch,
    after a resume, and under manual optimization."""

    def __init__(self) -> None:
        self._seen: int | None = None

    def start(self, trainer: L.Trainer) -> None:
        """Call in ``on_train_start``: the step the fit starts (or resumes) from."""
        self._seen = trainer.global_step

    def ended(self, trainer: L.Trainer) -> bool:
        """Whether an optimizer step ended since the last call (or since ``start``)."""
        step = trainer.global_step
        if step == self._seen:
            return False
        self._seen = step
        return True
