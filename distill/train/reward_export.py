"""A trained reward model as a transformers ``*ForSequenceClassification`` directory (``num_labels=1``).

The backbone's weights keep their names (``model.*`` under Llama, ``transformer.*`` under GPT-2: the
causal LM and the classification model share the base-model prefix), the output head is dropped and
the objective's head becomes ``score.weight``. A LoRA adapter is merged first: the RL stage loads the
reward model as a plain scorer. Scores are read at the last non-pad token, as ``RewardModel`` reads
them in training, so the export scores what the module scored.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

SCORE_KEY = "objective.score.weight"


def merged_weights(peft_model: torch.nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The causal LM's weights with the LoRA adapter folded in, from the adapter model's state dict."""
    from peft import get_peft_model

    config = peft_model.peft_config["default"]
    base = AutoModelForCausalLM.from_config(peft_model.get_base_model().config)
    twin = get_peft_model(base, copy.deepcopy(config))
    twin.load_state_dict(weights, strict=False)
    return twin.merge_and_unload().state_dict()


def save_reward_model(
    directory: Path, config: PretrainedConfig, weights: dict[str, Tensor], score: Tensor, pad_token_id: int
) -> None:
    """Write ``weights`` (the causal LM's, merged) and ``score`` (1, H) as a sequence classifier."""
    config = copy.deepcopy(config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id  # the classifier finds each sequence's last token by it
    config.architectures = None
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    expected = set(model.state_dict())
    state = {name: tensor for name, tensor in weights.items() if name in expected}
    state["score.weight"] = score.reshape(1, -1)
    missing = sorted(expected - set(state))
    if missing:
        raise RuntimeError(f"reward model export: no weights for {missing[:5]} ({len(missing)} in all)")
    model.save_pretrained(directory, state_dict=state)
