"""The batches loaders yield and objectives train on, as small dataclasses.

Nothing edits a batch in place: ``Objective.prepare`` returns a new one (``dataclasses.replace``, or a
batch of another type: prompts become completion rows). They are not frozen: Lightning moves a batch to
the device and converts its floating tensors under a precision plugin by setting the fields of a copy
(``apply_to_collection``), which a frozen dataclass refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from distill.targets import BatchTargets


@dataclass(kw_only=True)
class TokenBatch:
    """Rows of tokens the student runs on: padded samples, packed rows of several, or prompt + completion
    rows. Position t of a row is trained on ``labels[t + 1]``."""

    input_ids: Tensor  # (B, T)
    labels: Tensor  # (B, T) IGNORE_INDEX where nothing is trained
    position_ids: Tensor | None = None  # (B, T) restart at 0 for every sample of a packed row (None: 0..T-1)
    attention_mask: Tensor | None = None  # (B, T) None: packed rows, masked by the position restarts
    sequence_index: Tensor | None = None  # (B, T) the sequence of each token, -1: padding (None: a row each)
    shas: list[str] | None = None  # each row's sample (unpacked sample batches: teacher collection)
    targets: BatchTargets | None = None  # the teachers' targets at the trainable positions (KD)
    noise_seed: int | None = None  # seeds the forward's dropout and NEFTune noise (GRPO's iterations)


@dataclass(kw_only=True)
class UnitBatch(TokenBatch):
    """Sequences in units of ``unit_size``: preference pairs or KTO samples, numbered in order."""

    unit_size: ClassVar[int]
    sequence_values: Tensor  # (S,) float32 each sequence's value (a pair's margin, a KTO label), NaN: none
    sequence_shas: list[str]  # (S,) each sequence's unit
    reference_logps: Tensor | None = None  # (S,) the reference's log-prob sums (``prepare``)


@dataclass(kw_only=True)
class PairBatch(UnitBatch):
    """Pair p's chosen response is sequence 2p, its rejected one 2p + 1."""

    unit_size: ClassVar[int] = 2


@dataclass(kw_only=True)
class UnpairedBatch(UnitBatch):
    """KTO samples: one sequence each, its label (1.0 desirable, 0.0 not) in ``sequence_values``."""

    unit_size: ClassVar[int] = 1
    kl_baseline: Tensor | None = None  # KTO's reference point z0 (``prepare``)


@dataclass(kw_only=True)
class PromptBatch:
    """Left-padded prompts to sample from, every prompt ending at the last column; the dataset's
    responses right-padded beside them where it has them."""

    prompt_ids: Tensor  # (P, L)
    prompt_mask: Tensor  # (P, L) 1 on tokens
    prompts: list[str]  # the rendered prompt texts
    messages: list[list[dict]]  # the prompts' conversations
    fields: dict[str, list]  # the records' other keys, for the reward functions
    sources: list[str]
    shas: list[str]
    response_ids: Tensor | None = None  # (P, R)
    response_mask: Tensor | None = None  # (P, R)
    # where the batch stands in its optimizer step's repeats (GRPO's num_iterations)
    window: int = 0
    iteration: int = 0
    iterations: int = 1


@dataclass(kw_only=True)
class CompletionBatch(TokenBatch):
    """Rows of [left-padded prompt | completion | padding] made in ``prepare`` from a ``PromptBatch``,
    labelled on the completions' tokens; a prompt's samples are consecutive rows."""

    prompt_shas: list[str]  # (P,) the prompts
    on_policy: bool = True  # sampled by the student now (False: the teacher's or the dataset's)


@dataclass(kw_only=True)
class RolloutBatch(CompletionBatch):
    """Completions scored by reward functions (GRPO, RLOO)."""

    rewards: Tensor  # (S, F) each reward function's unweighted reward
    reward_total: Tensor  # (S,) their weighted sum
    advantages: Tensor  # (S,)
    completion_lengths: Tensor  # (S,)
    stopped: Tensor  # (S,) bool: ended by a stop token
    reference_logps: Tensor | None = None  # (N,) the reference's log-prob of each completion token
    old_logps: Tensor | None = None  # (N,) the sampling policy's (a kept rollout's later iterations)


@dataclass
class UnbuiltBatch:
    """A batch only the student can build (``StudentModule.build_batch``): ``build(policy, synced)``
    samples with the policy (on-policy rounds) at the training step, inside the strategy's forward."""

    build: Callable[[nn.Module, bool], TokenBatch]


Batch = TypeVar("Batch")
Derived = TypeVar("Derived", bound=TokenBatch)


def extended(batch: TokenBatch, kind: type[Derived], **values: Any) -> Derived:
    """``batch``'s rows as a ``kind`` (a subclass of its type), ``values`` giving the fields it adds (or
    replaces)."""
    return kind(**{**{f.name: getattr(batch, f.name) for f in fields(batch)}, **values})


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with its tensors (teacher targets included) on ``device``; strings stay as they are."""
    return apply_to_collection(batch, Tensor, lambda t: t.to(device))
