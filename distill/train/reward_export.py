"""A trained reward model as a transformers ``*ForSequenceClassification`` directory (``num_labels=1``;
docs/preference.md, "Reward model export"). The backbone's weights keep their names (the causal LM and
the classification model share the base-model prefix), the output head is dropped and the objective's
head becomes ``score.weight``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification, PretrainedConfig

SCORE_KEY = "objective.score.weight"


def save_reward_adapter(
    directory: Path, peft_model: torch.nn.Module, weights: dict[str, Tensor], score: Tensor, pad_token_id: int
) -> None:
    """The LoRA adapter as a ``SEQ_CLS`` adapter with the head in ``modules_to_save``: it loads onto
    ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)`` with ``PeftModel``, and
    ``python -m distill merge`` folds it into that base."""
    from peft import get_peft_model

    config = copy.deepcopy(peft_model.peft_config["default"])
    config.task_type = "SEQ_CLS"
    config.modules_to_save = [*(config.modules_to_save or []), "score"]
    with torch.device("meta"):
        base = AutoModelForSequenceClassification.from_config(
            classifier_config(peft_model.get_base_model().config, pad_token_id)
        )
        twin = get_peft_model(base, config)
    state = {name: tensor for name, tensor in weights.items() if "lora_" in name or "modules_to_save" in name}
    head = score.reshape(1, -1)
    state["base_model.model.score.modules_to_save.default.weight"] = head
    state["base_model.model.score.original_module.weight"] = head
    twin.save_pretrained(directory, state_dict=state, save_embedding_layers=False)


def classifier_config(config: PretrainedConfig, pad_token_id: int) -> PretrainedConfig:
    """``config`` for a sequence classifier of one score."""
    config = copy.deepcopy(config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id  # the classifier finds each sequence's last token by it
    config.architectures = None
    return config


def save_reward_model(
    directory: Path, config: PretrainedConfig, weights: dict[str, Tensor], score: Tensor, pad_token_id: int
) -> None:
    """Write ``weights`` (the causal LM's full state dict) and ``score`` (1, H) as a sequence classifier."""
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(classifier_config(config, pad_token_id))
    expected = set(model.state_dict())
    state = {name: tensor for name, tensor in weights.items() if name in expected}
    state["score.weight"] = score.reshape(1, -1)
    missing = sorted(expected - set(state))
    if missing:
        raise RuntimeError(f"reward model export: no weights for {missing[:5]} ({len(missing)} in all)")
    model.save_pretrained(directory, state_dict=state)
