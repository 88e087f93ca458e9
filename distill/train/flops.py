"""Model FLOPs of a decoder-only transformer per batch: what ThroughputMonitor turns into MFU.

PaLM's count (Chowdhery et al. 2022, appendix B): ``6 N + 12 L W T`` FLOPs per token to train, of which
``2 N + 4 L W T`` are the forward pass, with distill's departures (the head only at positions that carry
loss; a frozen weight costs 4, not 6; no recomputation): docs/scaling.md, "Throughput and MFU". Padding
positions count (the device computes them). A mixture of experts counts every expert, an overestimate;
sliding-window attention counts the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """What a transformer's FLOPs depend on, beside the batch."""

    layers: int
    attention_width: int  # heads x head size: the width of QK^T and AV
    body_params: int  # matmul weights of the layers (projections, MLP, LoRA): no embedding, no head
    body_trainable: int  # of which trainable
    head_params: int  # vocabulary x hidden
    head_trainable: bool


def transformer_flops(
    shape: ModelShape, rows: int, seq_len: int, head_positions: int, backward: bool = True
) -> int:
    """FLOPs of one batch of ``rows`` x ``seq_len`` tokens whose head runs at ``head_positions``;
    forward only unless ``backward``."""
    tokens = rows * seq_len
    body = 2 * shape.body_params * tokens
    attention = 4 * shape.layers * shape.attention_width * seq_len * tokens
    head = 2 * shape.head_params * head_positions
    if not backward:
        return body + attention + head
    body_backward = 2 * (shape.body_params + shape.body_trainable) * tokens
    head_backward = 2 * shape.head_params * (1 + shape.head_trainable) * head_positions
    # the gradients of both operands of QK^T and AV: twice the forward
    return body + attention + head + body_backward + 2 * attention + head_backward


def model_shape(model: nn.Module) -> ModelShape:
    """The shape of a transformers causal LM (LoRA layers inside it count as body weights).

    Every 2-D weight but the embeddings' and the head's is a matmul weight; ZeRO-3's empty shards tell
    their full shape in ``ds_shape``, bitsandbytes' packed 4-bit ones in ``quant_state.shape``.
    """
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()}
    lookups = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    body = trainable = 0
    for param in model.parameters():
        if id(param) in head_ids or id(param) in lookups or len(_shape(param)) != 2:
            continue
        body += _numel(param)
        trainable += _numel(param) if param.requires_grad else 0
    # a peft ``modules_to_save`` head holds the original and a trained copy: one of them runs
    head_weights = [p for p in head.parameters() if len(_shape(p)) == 2]
    return ModelShape(
        layers=config.num_hidden_layers,
        attention_width=heads * head_dim,
        body_params=body,
        body_trainable=trainable,
        head_params=_numel(head_weights[0]),
        head_trainable=any(p.requires_grad for p in head_weights),
    )


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:  # bitsandbytes' 4-bit weights are packed two per byte into (n / 2, 1)
        return tuple(quant_state.shape)
    return tuple(getattr(param, "ds_shape", param.shape))


def _numel(param: nn.Parameter) -> int:
    if getattr(param, "quant_state", None) is not None:
        return math.prod(_shape(param))
    return int(getattr(param, "ds_numel", param.numel()))
