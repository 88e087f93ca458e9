"""What is kept: the most important layers, channels, KV groups and hidden channels for the targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PretrainedConfig

from distill.prune.importance import Importance
from distill.prune.options import Pruning, PruningError


@dataclass(frozen=True)
class Kept:
    """Indices into the original model, each ascending (so keeping everything changes nothing)."""

    layers: list[int]
    channels: list[Tensor]
    """Per original layer (all of them; only ``layers`` are used): the MLP channels kept."""
    groups: list[Tensor]
    """Per original layer: the KV groups kept (each with all its query heads)."""
    hidden: Tensor


def choose(importance: Importance, pruning: Pruning, config: PretrainedConfig) -> Kept:
    """The top-scoring parts for ``pruning``'s targets; a dimension without a target is kept whole."""
    group = config.num_attention_heads // config.num_key_value_heads
    groups = None if pruning.num_attention_heads is None else pruning.num_attention_heads // group
    order = sorted(_droppable(config.num_hidden_layers, pruning), key=lambda i: importance.layers[i])
    if pruning.num_layers is not None:
        drop = order[: config.num_hidden_layers - pruning.num_layers]
    elif pruning.max_params is not None:
        base, per_layer = layer_params(config, pruning)
        excess = base + per_layer * config.num_hidden_layers - pruning.max_params
        drop = order[: max(0, -(-excess // per_layer))]
    else:
        drop = []
    return Kept(
        layers=sorted(set(range(config.num_hidden_layers)) - set(drop)),
        channels=[_top(scores, pruning.intermediate_size) for scores in importance.channels],
        groups=[_top(scores, groups) for scores in importance.groups],
        hidden=_top(importance.hidden, pruning.hidden_size),
    )


def check_budget(config: PretrainedConfig, pruning: Pruning) -> None:
    """Refuse a ``max_params`` that even the fewest layers allowed exceed (before any calibration)."""
    if pruning.max_params is None:
        return
    base, per_layer = layer_params(config, pruning)
    fewest = config.num_hidden_layers - len(_droppable(config.num_hidden_layers, pruning))
    if base + fewest * per_layer > pruning.max_params:
        raise PruningError(
            f"pruning.max_params is {pruning.max_params}: with the width targets, {fewest} layer(s) (the "
            f"fewest allowed{', keep_first_last' if pruning.keep_first_last else ''}) already make "
            f"{base + fewest * per_layer} parameters ({per_layer} per layer, {base} outside them)"
        )


def layer_params(config: PretrainedConfig, pruning: Pruning) -> tuple[int, int]:
    """Parameters outside the decoder layers and per layer, of the model pruned to ``pruning``'s widths
    (counted on the meta device: nothing is allocated)."""
    counts = []
    for layers in (1, 2):
        width = widths(config, pruning)
        shape = pruned_config(config, layers=list(range(layers)), **width)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(shape)
        counts.append(sum(p.numel() for p in model.parameters()))
    return counts[0] - (counts[1] - counts[0]), counts[1] - counts[0]


def widths(config: PretrainedConfig, pruning: Pruning) -> dict[str, int]:
    group = config.num_attention_heads // config.num_key_value_heads
    heads = pruning.num_attention_heads or config.num_attention_heads
    return {
        "intermediate_size": pruning.intermediate_size or config.intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // group,
        "hidden_size": pruning.hidden_size or config.hidden_size,
    }


def pruned_config(config: PretrainedConfig, layers: list[int], **sizes: int) -> PretrainedConfig:
    """``config`` with ``layers`` of the original kept (per-layer lists such as ``layer_types`` cut to
    them) and the new ``sizes``; the head dimension stays the original's, written explicitly."""
    values = config.to_dict()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for key, value in values.items():
        # every per-layer list (layer_types and the like) follows the kept layers
        if isinstance(value, list) and len(value) == config.num_hidden_layers and key != "architectures":
            values[key] = [value[i] for i in layers]
    values.update(sizes, num_hidden_layers=len(layers), head_dim=head_dim)
    return type(config).from_dict(values)


def _droppable(num_layers: int, pruning: Pruning) -> list[int]:
    ends = {0, num_layers - 1} if pruning.keep_first_last else set()
    return [i for i in range(num_layers) if i not in ends]


def _top(scores: Tensor, count: int | None) -> Tensor:
    if count is None:
        return torch.arange(len(scores))
    return scores.topk(count).indices.sort().values
