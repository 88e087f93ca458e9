"""What an objective is told about the fit it trains in.

An objective never holds the LightningModule, the trainer or the data module: ``setup`` gets a
``Context`` (the tokenizer, what the data says, the policy, the ranks and their collectives), and
``prepare`` a ``Step`` (whether it trains, and where in the fit). ``StudentModule`` builds both; a test
builds them in a line or two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from distill.data.facts import DataFacts


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under any peft wrapper (LoRA layers stay in place inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True)
class Policy:
    """The student's model as objectives use it: to sample from, to score with, or with its LoRA adapter
    off (the policy's own base as a reference)."""

    model: nn.Module  # what generates: the peft wrapper where there is one
    has_adapter: bool = False

    @property
    def causal_lm(self) -> nn.Module:
        return unwrapped(self.model)

    @contextmanager
    def adapter_disabled(self) -> Iterator[nn.Module]:
        """The base model's forward: the LoRA adapter off inside the block."""
        with self.model.disable_adapter():
            yield self.causal_lm


@dataclass(frozen=True)
class Origin:
    """Where the student's starting weights came from: a frozen reference's defaults."""

    model: str | None = None  # name or path (None: built from a config)
    model_kwargs: dict = field(default_factory=dict)  # its from_pretrained arguments (a revision)
    dtype: str | None = None
    tokenizer: str | None = None  # name or path


@dataclass(frozen=True)
class Step:
    """Where a batch stands in the fit: seeds are a function of it, so a resumed fit draws the same."""

    training: bool = False
    epoch: int = 0
    batch: int = 0  # batches of the epoch already trained


def _same(value: Tensor) -> Tensor:
    return value


@dataclass(frozen=True)
class Context:
    tokenizer: PreTrainedTokenizerBase
    data: DataFacts
    policy: Policy
    origin: Origin = Origin()
    rank: int = 0
    world_size: int = 1
    sharded: bool = False  # weights sharded over the ranks (FSDP, ZeRO-3): every rank generates at once
    mean_over_ranks: Callable[[Tensor], Tensor] = _same
    barrier: Callable[[str], None] = lambda name: None
    unpartitioned: Callable[[], AbstractContextManager] = nullcontext  # ZeRO-3 off while modules are made
