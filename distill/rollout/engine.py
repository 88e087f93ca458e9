"""Sampling completions from the policy behind one small interface.

An engine maps left-padded prompts to ``num_samples`` completions each (token ids, padded after their
stop token). ``TransformersEngine`` is the built-in: ``model.generate`` with the KV cache, in eval mode
(also when training uses gradient checkpointing, which turns the cache off), seeded per call so that a
resumed fit draws the same rollouts. A faster engine (vLLM on GPUs) implements the same call.

What is sampled is defined by ``Sampling`` alone: the temperature-scaled softmax, cut by top-k and top-p,
the distribution whose log-probs the RL and on-policy losses take. A checkpoint's saved
``generation_config.json`` (Qwen2.5-Instruct's ``repetition_penalty`` 1.05 and ``top_k`` 20) is not
read: sampling from it would train off-policy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from distill.ranges import require
from distill.rollout.completions import Completions, trim_at_stop


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn."""

    max_new_tokens: int = 128
    """Longest completion; longer ones are cut (and count as truncated)."""
    temperature: float = 1.0
    """Of the sampling distribution (RL objectives take their log-probs of the same)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = 0
    """Top-k sampling (0: off)."""

    def __post_init__(self) -> None:
        require("sampling.max_new_tokens", self.max_new_tokens, at_least=1)
        require("sampling.temperature", self.temperature, above=0)
        require("sampling.top_p", self.top_p, above=0, at_most=1)
        require("sampling.top_k", self.top_k, at_least=0)


def rollout_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, the same in every process (``hash`` of a str is salted)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# Options distill has none of, each at the value that turns it off (plain multinomial sampling). The
# ones not named here are left unset: transformers reads None as off.
OFF: dict[str, object] = {
    **dict.fromkeys(("num_beams", "num_beam_groups"), 1),
    **dict.fromkeys(("min_length", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size"), 0),
    **dict.fromkeys(("length_penalty", "typical_p", "repetition_penalty", "encoder_repetition_penalty"), 1.0),
    **dict.fromkeys(("diversity_penalty", "epsilon_cutoff", "eta_cutoff"), 0.0),
    **dict.fromkeys(("early_stopping", "renormalize_logits", "remove_invalid_values", "use_mtp"), False),
    **dict.fromkeys(("token_healing", "output_scores", "output_logits", "return_dict_in_generate"), False),
}


def generation_options(sampling: Sampling, num_samples: int, stop_ids: list[int], pad_id: int) -> dict:
    """Every option of transformers' ``GenerationConfig``, from ``sampling`` alone.

    ``generate`` fills each option it is not given from the model's saved ``generation_config`` (also when
    handed a ``GenerationConfig``: its unset fields, or in transformers 4.x its fields equal to the
    global defaults); its keyword arguments are the one layer above, so all of them are given.
    """
    fresh = GenerationConfig()  # this transformers' options, at its defaults (None: unset, off)
    options = {k: v for k, v in vars(fresh).items() if not k.startswith("_") and k != "transformers_version"}
    options.update({k: v for k, v in OFF.items() if k in options})
    options.update(
        do_sample=True,
        num_return_sequences=num_samples,
        max_new_tokens=sampling.max_new_tokens,
        max_length=None,  # max_new_tokens decides
        min_new_tokens=None,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k or None,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )
    return options


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
    """``model.generate`` (sampling, KV cache, eval mode), seeded by ``seed``, with every generation option
    given (``generation_options``): the checkpoint's own defaults never act."""

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
                    synced_gpus=synced,
                    **generation_options(sampling, num_samples, stop_ids, pad_id),
                )
        finally:
            model.train(was_training)
        return out[:, prompt_ids.shape[1] :]


@dataclass(frozen=True)
class Sampler:
    """An engine with what its calls in one fit (or one ``generate`` run) share; its completions cut
    after their first stop token."""

    engine: Engine
    sampling: Sampling
    stop_ids: list[int]
    pad_id: int
    synced: bool = False  # sharded weights: every rank keeps stepping until all are done

    def __call__(
        self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int, seed: int
    ) -> Completions:
        ids = self.engine(
            model,
            prompt_ids,
            prompt_mask,
            num_samples=num_samples,
            sampling=self.sampling,
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            seed=seed,
            synced=self.synced,
        )
        return trim_at_stop(ids, self.stop_ids, self.pad_id)
