"""Training metrics, kept as sums so that DDP reduction and epoch means weigh every unit equally."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class ObjectiveMetrics(Metric):
    """Loss per unit (token, pair, ...), top-1 accuracy per token, perplexity, and the objective's extra
    sums as means per unit.

    Perplexity is exp of the cross-entropy per token: the ``ce`` sum when the objective reports one (KD),
    else the loss when the loss is that cross-entropy (PT/SFT); a policy or preference loss has none.
    """

    full_state_update = False

    def __init__(
        self, extra: tuple[str, ...] = (), unit: str = "token", loss_is_cross_entropy: bool = False
    ) -> None:
        super().__init__()
        self.extra, self.unit, self.loss_is_cross_entropy = extra, unit, loss_is_cross_entropy
        # metric names may hold "/" (rewards/chosen): the states get plain names
        self._state_of = {name: f"extra_{i}" for i, name in enumerate(extra)}
        for name in ("loss_sum", "units", "correct", "tokens", *self._state_of.values()):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("has_correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")

    def update(
        self,
        loss_sum: torch.Tensor,
        correct: torch.Tensor | None,
        units: int,
        tokens: int,
        **sums: torch.Tensor,
    ) -> None:
        # new tensors, not in-place updates: states a validate() reset under inference mode would
        # refuse an in-place update in a later fit's validation
        self.loss_sum = self.loss_sum + loss_sum.detach().double()
        self.units = self.units + units
        self.tokens = self.tokens + tokens
        if correct is not None:
            self.correct = self.correct + correct.detach().double()
            self.has_correct = torch.ones_like(self.has_correct)
        for name, value in sums.items():
            state = self._state_of[name]
            setattr(self, state, getattr(self, state) + value.detach().double())

    def compute(self) -> dict[str, torch.Tensor]:
        units = self.units.clamp(min=1)
        values = {"loss": self.loss_sum / units}
        ce = getattr(self, self._state_of["ce"]) / units if "ce" in self.extra else None
        if ce is None and self.loss_is_cross_entropy and self.unit == "token":
            ce = values["loss"]
        if ce is not None:
            values["ppl"] = torch.exp(ce.clamp(max=math.log(1e30)))
        if self.has_correct > 0:
            values["acc"] = self.correct / self.tokens.clamp(min=1)
        values.update({name: getattr(self, state) / units for name, state in self._state_of.items()})
        return {k: v.float() for k, v in values.items()}
