"""What a data module tells the objective that trains on its batches, once it is set up."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from distill.data.batch import UnitBatch
from distill.data.templates import ChatTemplate

BatchKind = Literal["samples", "pairs", "unpaired", "prompts"]
"""``samples``: token rows with labels (PT, SFT, KD); ``pairs``: chosen/rejected sequences 2p, 2p + 1;
``unpaired``: KTO's one-sequence units with a desirable label; ``prompts``: prompts to sample from."""


class Units(Protocol):
    """A data set's units (pairs, KTO samples), for work done once over all of them (a precomputed
    reference)."""

    def identity(self) -> list[str]:
        """What the units are a function of: their tokenized-cache entries."""

    def unit_count(self, rank: int, world_size: int) -> int: ...

    def unit_batches(self, rank: int, world_size: int) -> Iterator[UnitBatch]: ...


@dataclass(frozen=True)
class DataFacts:
    source: str  # the data module's class, named in messages
    batches: BatchKind
    pad_id: int
    chat_template: ChatTemplate | None = None
    stop_ids: tuple[int, ...] = ()  # what generation stops on (prompt batches)
    responses: bool = False  # prompt batches also carry the dataset's responses
    num_iterations: int = 1  # times each optimizer step's prompt batches come in a row
    teacher_names: tuple[str, ...] = ()  # cached teacher targets joined into the batches, by teacher
    cross_tokenizer: bool = False  # those teachers have another tokenizer: some positions lack targets
    units: Units | None = None
