"""Sampling completions from the policy behind one small interface.

An engine maps left-padded prompts to ``num_samples`` completions each (token ids, padded after their
stop token). ``TransformersEngine`` is the built-in: ``model.generate`` with the KV cache, in eval mode
(also when training uses gradient checkpointing, which turns the cache off), seeded per call so that a
resumed fit draws the same rollouts. A faster engine (vLLM on GPUs) implements the same call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def rollout_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, the same in every process (``hash`` of a str is salted)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Engine(Protocol):
    def __call__(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        *,
        num_samples: int,
        sampling: Sampling,
        stop_ids: list[int],
        pad_id: int,
        seed: int,
        synced: bool = False,
    ) -> Tensor:
        """(P * num_samples, C) completion ids, the samples of one prompt consecutive; ``synced``: every
        rank keeps stepping until all are done (sharded weights: FSDP, ZeRO-3)."""
        ...


class TransformersEngine:
    """``model.generate`` (sampling, KV cache, eval mode), seeded by ``seed``."""

    def __call__(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        *,
        num_samples: int,
        sampling: Sampling,
        stop_ids: list[int],
        pad_id: int,
        seed: int,
        synced: bool = False,
    ) -> Tensor:
        was_training = model.training
        model.eval()  # dropout off; transformers keeps the cache on under gradient checkpointing only in eval
        devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(seed)
                out = model.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    do_sample=True,
                    num_return_sequences=num_samples,
                    max_new_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k or None,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                    use_cache=True,
                    synced_gpus=synced,
                )
        finally:
            model.train(was_training)
        return out[:, prompt_ids.shape[1] :]
