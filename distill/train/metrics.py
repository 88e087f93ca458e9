"""Token-level metrics, kept as sums so that DDP reduction and epoch means weigh every token equally."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class TokenMetrics(Metric):
    """Loss, perplexity and top-1 accuracy per token, plus any extra per-token sums an objective reports.

    Perplexity is exp of the cross-entropy: the ``ce`` sum when the objective reports one (KD), else the loss.
    """

    full_state_update = False

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.extra = extra
        for name in ("loss_sum", "correct", "tokens", *extra):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, loss_sum: torch.Tensor, correct: torch.Tensor, tokens: int, **sums: torch.Tensor
    ) -> None:
        self.loss_sum += loss_sum.detach().double()
        self.correct += correct.detach().double()
        self.tokens += tokens
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value.detach().double())

    def compute(self) -> dict[str, torch.Tensor]:
        tokens = self.tokens.clamp(min=1)
        loss = self.loss_sum / tokens
        ce = self.ce / tokens if "ce" in self.extra else loss
        values = {
            "loss": loss,
            "ppl": torch.exp(ce.clamp(max=math.log(1e30))),
            "acc": self.correct / tokens,
        }
        values.update({name: getattr(self, name) / tokens for name in self.extra})
        return {k: v.float() for k, v in values.items()}
