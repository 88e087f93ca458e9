"""Next-token cross-entropy: the objective of continued pretraining and SFT."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill.objectives.base import Loss, LossInputs, Objective, over_chunks
from distill.ranges import require


class CrossEntropy(Objective):
    """Next-token cross-entropy on the labels: the ``pt`` and ``sft`` objectives."""

    loss_is_cross_entropy = True

    def __init__(self, chunk_size: int = 1024) -> None:
        """
        Args:
            chunk_size: Positions whose logits are computed at once; bounds peak memory at large vocabularies.
        """
        require("objective.chunk_size", chunk_size, at_least=1)
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, inputs: LossInputs) -> Loss:
        head = inputs.head

        def chunk_loss(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            logits = head(h).float()  # (n, V)
            loss = F.cross_entropy(logits, y, reduction="sum")
            return loss, (logits.argmax(-1) == y).sum().detach()

        loss_sum, correct = over_chunks(chunk_loss, inputs.hidden, inputs.labels, chunk_size=self.chunk_size)
        tokens = inputs.labels.numel()
        return Loss(loss_sum=loss_sum, num_units=tokens, num_tokens=tokens, correct=correct)
