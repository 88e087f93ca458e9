"""Reward model: a scalar head on the backbone, read at each sequence's last token, trained on pairs.

The head is this objective's own ``nn.Linear(hidden, 1, bias=False)``, the layout of transformers'
``*ForSequenceClassification.score`` with ``num_labels=1``: the optimizer, the checkpoint and the
sharding strategy see it as part of the student, and ``HFExport`` writes the backbone with it as a
model ``AutoModelForSequenceClassification`` loads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.losses.preference import reward_pair
from distill.objectives.base import Loss, LossInputs, Objective
from distill.objectives.context import Context


class RewardModel(Objective):
    """Bradley-Terry loss ``-logsigmoid(r_chosen - r_rejected - margin)`` (+ ``center_rewards`` x
    ``(r_chosen + r_rejected)**2``) on the head's scores of each pair."""

    unit = "pair"
    accepts = ("pairs",)
    metric_names = ("accuracy", "margin", "rewards/chosen", "rewards/rejected", "rewards/mean", "rewards/sq")

    def __init__(self, use_margin: bool = True, center_rewards: float = 0.0) -> None:
        """
        Args:
            use_margin: Subtract each pair's ``margin`` field (when the data has one) inside the sigmoid.
            center_rewards: Weight of ``(r_chosen + r_rejected)**2``, which keeps rewards centred on 0.
        """
        super().__init__()
        self.use_margin = use_margin
        self.center_rewards = center_rewards
        self.score: nn.Linear | None = None

    def setup(self, context: Context) -> None:
        tokenizer = context.tokenizer
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            # the exported classifier finds each sequence's last token as the last one that is not the
            # pad token: with pad = EOS it would skip the EOS that ends every response
            raise ValueError(
                "RewardModel needs a tokenizer whose pad token is not its EOS token "
                f"({tokenizer.eos_token!r}); give the tokenizer a pad token of its own (e.g. an unused "
                "reserved token)"
            )
        lm = context.policy.causal_lm
        head = lm.get_output_embeddings()
        if head is not None and head.weight is not lm.get_input_embeddings().weight:
            # an untied LM head takes no part in the reward: trainable, DDP would wait for its gradient
            head.requires_grad_(False)
        if self.score is not None:
            return
        config = lm.config.get_text_config()
        with context.unpartitioned():  # under ZeRO-3 the init would apply to an empty placeholder
            self.score = nn.Linear(config.hidden_size, 1, bias=False)
            nn.init.normal_(self.score.weight, std=getattr(config, "initializer_range", 0.02))
            self.score.to(next(lm.parameters()).dtype)

    def rewards(self, last_hidden: Tensor) -> Tensor:
        """(S,) the score of each sequence from its last token's hidden state."""
        return self.score(last_hidden.to(self.score.weight.dtype)).squeeze(-1).float()

    def forward(self, inputs: LossInputs) -> Loss:
        rewards = self.rewards(inputs.last_hidden)
        chosen, rejected = rewards[0::2], rewards[1::2]
        margin = None
        if self.use_margin:
            margin = torch.nan_to_num(inputs.batch.sequence_values[0::2].to(chosen), nan=0.0)
        out = reward_pair(chosen, rejected, margin=margin, center_rewards=self.center_rewards)
        gap = (chosen - rejected).detach()
        both = torch.cat([chosen, rejected]).detach()
        metrics = {
            "accuracy": (gap > 0).sum(),
            "margin": gap.sum(),
            "rewards/chosen": chosen.detach().sum(),
            "rewards/rejected": rejected.detach().sum(),
            # per pair: the mean and the mean square of its two rewards, for the std in derived_metrics
            "rewards/mean": both.sum() / 2,
            "rewards/sq": (both**2).sum() / 2,
        }
        return Loss(out.loss.sum(), num_units=chosen.shape[0], num_tokens=0, sums=metrics)

    @staticmethod
    def derived_metrics(values: dict[str, Tensor]) -> dict[str, Tensor]:
        """The rewards' std from their mean and mean square (in place of the mean square)."""
        values = dict(values)
        square = values.pop("rewards/sq")
        values["rewards/std"] = (square - values["rewards/mean"] ** 2).clamp(min=0.0).sqrt()
        return values
