"""The pruned model: the original's weights sliced to what is kept, loaded into a fresh model of the same
class built from the pruned config (so layer indices, head counts, rotary sizes and tied embeddings are
the new config's, as ``from_pretrained`` would build them)."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from distill.prune.options import PruningError
from distill.prune.selection import Kept, pruned_config

LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# rows (output features) and columns (input features) of each weight, by what they index:
# "hidden", "channels" (MLP), "q" (query heads' dims), "kv" (KV heads' dims), or None (all)
LAYER_SLICES: dict[str, tuple[str | None, str | None]] = {
    "self_attn.q_proj": ("q", "hidden"),
    "self_attn.k_proj": ("kv", "hidden"),
    "self_attn.v_proj": ("kv", "hidden"),
    "self_attn.o_proj": ("hidden", "q"),
    "mlp.gate_proj": ("channels", "hidden"),
    "mlp.up_proj": ("channels", "hidden"),
    "mlp.down_proj": ("hidden", "channels"),
    "input_layernorm": ("hidden", None),
    "post_attention_layernorm": ("hidden", None),
}
MODEL_SLICES: dict[str, tuple[str | None, str | None]] = {
    "model.embed_tokens": (None, "hidden"),
    "model.norm": ("hidden", None),
    "lm_head": (None, "hidden"),
}


def prune_model(model: PreTrainedModel, kept: Kept) -> PreTrainedModel:
    """A new model of ``model``'s class and dtype holding only what ``kept`` names."""
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    new_config = pruned_config(
        config,
        kept.layers,
        intermediate_size=len(kept.channels[kept.layers[0]]),
        num_attention_heads=len(kept.groups[kept.layers[0]]) * group,
        num_key_value_heads=len(kept.groups[kept.layers[0]]),
        hidden_size=len(kept.hidden),
    )
    head_dim = new_config.head_dim
    weights = {}
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        match = LAYER.fullmatch(module)
        if match:
            old = int(match.group(1))
            if old not in kept.layers:
                continue
            rows, columns = _slices(LAYER_SLICES, match.group(2), name)
            groups = kept.groups[old]
            heads = (groups[:, None] * group + torch.arange(group)).flatten()
            index = {
                "hidden": kept.hidden,
                "channels": kept.channels[old],
                "q": _dims(heads, head_dim),
                "kv": _dims(groups, head_dim),
            }
            name = f"model.layers.{kept.layers.index(old)}.{match.group(2)}.{kind}"
        else:
            rows, columns = _slices(MODEL_SLICES, module, name)
            index = {"hidden": kept.hidden}
        weights[name] = _slice(tensor, index.get(rows), index.get(columns) if kind == "weight" else None)
    pruned = type(model)(new_config).to(model.dtype)
    pruned.load_state_dict(weights, strict=True)
    pruned.generation_config = model.generation_config
    return pruned.eval()


Slices = dict[str, tuple[str | None, str | None]]


def _slices(table: Slices, module: str, name: str) -> tuple[str | None, str | None]:
    if module not in table:
        # a weight the slicing does not know (QK norms, a bias elsewhere): pruning it blindly would break it
        raise PruningError(f"pruning does not know how to slice {name} (not a Llama/Mistral/Qwen2 layout)")
    return table[module]


def _dims(heads: Tensor, head_dim: int) -> Tensor:
    """The feature indices of ``heads`` in a projection of ``head_dim`` features per head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _slice(tensor: Tensor, rows: Tensor | None, columns: Tensor | None) -> Tensor:
    if rows is not None:
        tensor = tensor.index_select(0, rows.to(tensor.device))
    if columns is not None:
        tensor = tensor.index_select(1, columns.to(tensor.device))
    return tensor.clone()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
