"""Sampled completions -> a training batch: prompt + completion rows whose labels are the completion's
tokens up to and including its stop token (the rest of the row is padding, never trained on)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.data.batch import TokenBatch
from distill.data.encoding import IGNORE_INDEX


@dataclass
class Completions:
    """``num_samples`` completions of each prompt, the samples of a prompt consecutive."""

    ids: Tensor  # (S, C) token ids, ``pad_id`` after the stop token
    mask: Tensor  # (S, C) bool: the completion's tokens, its stop token included
    stopped: Tensor  # (S,) bool: ended by a stop token (False: cut at max_new_tokens)

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=1)


def trim_at_stop(ids: Tensor, stop_ids: list[int], pad_id: int) -> Completions:
    """The completions cut after their first stop token (what the engine sampled after it is padding)."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
    stopped = is_stop.any(dim=1)
    first = torch.where(stopped, is_stop.int().argmax(dim=1), ids.shape[1] - 1)  # the last kept token
    positions = torch.arange(ids.shape[1], device=ids.device)
    mask = positions[None, :] <= first[:, None]
    return Completions(ids=torch.where(mask, ids, pad_id), mask=mask, stopped=stopped)


def rollout_batch(prompt_ids: Tensor, prompt_mask: Tensor, completions: Completions) -> TokenBatch:
    """Rows of [left-padded prompt | completion | padding] for the student's forward.

    ``prompt_ids`` (P, L) are the prompts once each; every one is repeated for its consecutive samples.
    Position ids count the tokens only, as ``generate`` did, so the forward sees what was sampled from.
    """
    samples = completions.ids.shape[0] // prompt_ids.shape[0]
    prompts = prompt_ids.repeat_interleave(samples, dim=0)
    mask = torch.cat([prompt_mask.repeat_interleave(samples, dim=0).bool(), completions.mask], dim=1)
    width = int(mask.int().cumsum(dim=1).argmax(dim=1).max()) + 1  # drop columns that are all padding
    input_ids = torch.cat([prompts, completions.ids], dim=1)[:, :width]
    mask = mask[:, :width]
    completion = torch.zeros_like(mask)
    completion[:, prompt_ids.shape[1] :] = completions.mask[:, : max(0, width - prompt_ids.shape[1])]
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=mask.long(),
        position_ids=(mask.long().cumsum(dim=1) - 1).clamp(min=0),
        labels=torch.where(completion, input_ids, IGNORE_INDEX),
    )
