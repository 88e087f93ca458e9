"""Importance measured on calibration batches through forward hooks: per decoder layer (depth), per MLP
channel, per KV group of attention heads and per hidden channel (width), as Minitron ranks them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distill.data.batch import TokenBatch


@dataclass
class Importance:
    """Scores, higher for what matters more; indexed by the model's original layers and channels."""

    layers: list[float]
    """Per decoder layer: the cosine distance between its input and output, or the loss increase when
    skipped (``metric``)."""
    metric: str
    channels: list[Tensor]
    """Per layer, (intermediate_size,): mean |input of the down projection| over the calibration tokens."""
    groups: list[Tensor]
    """Per layer, (num_key_value_heads,): the summed mean L2 norms of each KV group's query heads' outputs."""
    hidden: Tensor
    """(hidden_size,): mean |output| of every layer norm of every layer, summed over the layers."""


class _Sums:
    """Per-token statistics summed over the real (unpadded) tokens of every batch."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None  # (B, T, 1) of the batch running now
        self.sums: dict[str, Tensor] = {}
        self.tokens = 0

    def add(self, name: str, values: Tensor) -> None:
        """``values`` (B, T, ...) summed over the batch's real tokens into ``name``."""
        mask = self.mask.reshape(*self.mask.shape[:2], *[1] * (values.dim() - 2))
        total = (values.float() * mask).sum(dim=(0, 1))
        self.sums[name] = self.sums[name] + total if name in self.sums else total

    def mean(self, name: str) -> Tensor:
        return (self.sums[name] / max(self.tokens, 1)).cpu()


def measure(model: nn.Module, batches: Iterable[TokenBatch], metric: str = "cosine") -> Importance:
    """Every score of ``Importance`` for ``model`` (a Llama-layout causal LM) on ``batches``."""
    batches = list(batches)
    layers = model.get_decoder().layers
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    sums = _Sums()
    hooks: list[tuple[nn.Module, str, Callable]] = []
    for i, layer in enumerate(layers):
        hooks += [
            (layer, "forward", _layer_distance(sums, f"layer{i}")),
            (layer.mlp.down_proj, "pre", _abs_input(sums, f"channels{i}")),
            (layer.self_attn.o_proj, "pre", _group_norms(sums, f"groups{i}", heads, kv_heads)),
            (layer.input_layernorm, "forward", _abs_output(sums, "hidden")),
            (layer.post_attention_layernorm, "forward", _abs_output(sums, "hidden")),
        ]
    with _hooked(hooks):
        base_loss = _run(model, batches, sums, loss=metric == "loss")
    if metric == "loss":
        scores = [_run(model, batches, None, skip=layer) - base_loss for layer in layers]
    else:
        scores = [float(sums.mean(f"layer{i}")) for i in range(len(layers))]
    return Importance(
        layers=scores,
        metric=metric,
        channels=[sums.mean(f"channels{i}") for i in range(len(layers))],
        groups=[sums.mean(f"groups{i}") for i in range(len(layers))],
        hidden=sums.mean("hidden"),
    )


@torch.no_grad()
def _run(
    model: nn.Module,
    batches: list[TokenBatch],
    sums: _Sums | None,
    skip: nn.Module | None = None,
    loss: bool = True,
) -> float:
    """The mean next-token loss over the batches' real tokens, with ``skip`` (a layer) made an identity
    (``loss`` False: the decoder alone runs, for the hooks, and the loss is 0)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    handle = skip.register_forward_hook(lambda _, args, __: args[0]) if skip is not None else None
    try:
        for batch in batches:
            mask = batch.attention_mask.to(device)
            if sums is not None:
                sums.mask = mask[..., None]
                sums.tokens += int(mask.sum())
            inputs = {
                "input_ids": batch.input_ids.to(device),
                "attention_mask": mask,
                "position_ids": batch.position_ids.to(device) if batch.position_ids is not None else None,
            }
            if not loss:
                model.get_decoder()(**inputs)
                continue
            logits = model(**inputs).logits
            targets = batch.input_ids.to(device)[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            summed = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
            total, count = total + float(summed), count + int((targets != -100).sum())
    finally:
        if handle is not None:
            handle.remove()
    return total / max(count, 1)


@contextmanager
def _hooked(hooks: list[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    handles = [
        module.register_forward_pre_hook(hook) if kind == "pre" else module.register_forward_hook(hook)
        for module, kind, hook in hooks
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _output(output: Any) -> Tensor:
    # a decoder layer of transformers 4 returns a tuple
    return output[0] if isinstance(output, tuple) else output


def _layer_distance(sums: _Sums, name: str) -> Callable:
    def hook(_: nn.Module, args: tuple, output: Any) -> None:
        sums.add(name, 1 - F.cosine_similarity(args[0].float(), _output(output).float(), dim=-1))

    return hook


def _abs_input(sums: _Sums, name: str) -> Callable:
    def hook(_: nn.Module, args: tuple) -> None:
        sums.add(name, args[0].abs())

    return hook


def _abs_output(sums: _Sums, name: str) -> Callable:
    def hook(_: nn.Module, __: tuple, output: Any) -> None:
        sums.add(name, _output(output).abs())

    return hook


def _group_norms(sums: _Sums, name: str, heads: int, kv_heads: int) -> Callable:
    def hook(_: nn.Module, args: tuple) -> None:
        per_head = args[0].unflatten(-1, (heads, -1)).float().norm(dim=-1)  # (B, T, heads)
        sums.add(name, per_head.unflatten(-1, (kv_heads, heads // kv_heads)).sum(-1))  # (B, T, kv_heads)

    return hook
