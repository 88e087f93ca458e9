"""Preference pairs and KTO samples -> token ids and labels, and batches of them, a pair one unit.

Each response is rendered after its prompt with the chat template; its loss positions are the
response's tokens, found by the template's structure as SFT masking finds them (an earlier assistant
turn of a multi-turn prompt is context, not trained). A pair is stored as two consecutive samples,
chosen then rejected, under the pair's SHA; ``Grouped`` hands them out together, so shuffling,
packing, sharding and resume move pairs, never halves of one.

Over-long pairs lose prompt tokens from the left, the same number from both responses, so both keep
the same prompt; a pair whose responses alone do not fit is dropped as a unit (counted).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distill.data.batch import PairBatch, UnitBatch, UnpairedBatch, extended
from distill.data.batching import Collator
from distill.data.chunks import EncodedChunk, map_chunks
from distill.data.encoding import IGNORE_INDEX, Encoded, EncodingStats, encode_messages
from distill.data.pairs import Messages, PairRecord, UnpairedRecord
from distill.data.templates import ChatTemplate

CHUNK_RECORDS = 256  # records per chunk written to the tokenized cache


def encode_response(
    prompt: Messages,
    response: Messages,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    record: PairRecord | UnpairedRecord,
    value: float | None,
) -> Encoded:
    """The prompt and one response, labels on the response's assistant tokens only."""
    prompt_chars = len(template.render(tokenizer, list(prompt), generation_prompt=True))
    ids, labels = encode_messages(
        [*prompt, *response], tokenizer, template, record.source, trained_from=prompt_chars
    )
    return Encoded(ids, labels, record.sha, record.source, value=value)


def first_trainable(sample: Encoded) -> int:
    """Index of the first token with a label: the prompt is everything before it."""
    return next((i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX), len(sample.labels))


def truncate_unit(samples: list[Encoded], max_length: int) -> list[Encoded] | None:
    """The samples of one unit (a pair, or one KTO sample) cut to ``max_length`` by removing the same
    number of prompt tokens from the left of each; None when even the responses alone do not fit."""
    cut = max(len(s.input_ids) for s in samples) - max_length
    if cut <= 0:
        return samples
    # keep at least one prompt token: the first response token must be predicted from something
    if cut >= min(first_trainable(s) for s in samples):
        return None
    return [replace(s, input_ids=s.input_ids[cut:], labels=s.labels[cut:]) for s in samples]


def encode_unit(
    record: PairRecord | UnpairedRecord, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate
) -> list[Encoded]:
    """A pair's chosen and rejected sample (each carrying the pair's margin), or a KTO sample (carrying
    its label as 1.0 / 0.0)."""
    if isinstance(record, PairRecord):
        return [
            encode_response(record.prompt, response, tokenizer, template, record, record.margin)
            for response in (record.chosen, record.rejected)
        ]
    completion = encode_response(
        record.prompt, record.completion, tokenizer, template, record, float(record.label)
    )
    return [completion]


def encode_unit_chunk(
    records: Sequence[PairRecord | UnpairedRecord],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    max_length: int,
) -> EncodedChunk:
    """Encode, truncate and filter units; stats count units (pairs or KTO samples), tokens count both
    responses of a pair."""
    stats, kept = EncodingStats(), []
    for record in records:
        encoded = encode_unit(record, tokenizer, template)
        unit = truncate_unit(encoded, max_length)
        if stats.count(unit, unit is not encoded, record.source):
            kept.extend(unit)
    return EncodedChunk.of(kept, stats)


def encode_unit_chunks(
    records: Sequence[PairRecord | UnpairedRecord],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    max_length: int,
    num_proc: int = 1,
) -> Iterator[EncodedChunk]:
    """``encode_unit_chunk`` over consecutive chunks of ``records``, in order, in ``num_proc`` processes."""
    encode = partial(encode_unit_chunk, tokenizer=tokenizer, template=template, max_length=max_length)
    return map_chunks(records, encode, num_proc, CHUNK_RECORDS)


class Grouped(Sequence[list[Encoded]]):
    """Consecutive runs of ``size`` samples as one item: a pair (size 2) or a KTO sample (size 1)."""

    def __init__(self, samples: Sequence[Encoded], size: int) -> None:
        if len(samples) % size:
            raise ValueError(f"{len(samples)} samples do not make whole units of {size}")
        self.samples = samples
        self.size = size
        lengths = getattr(samples, "lengths", None)
        lengths = np.asarray(lengths if lengths is not None else [len(s.input_ids) for s in samples])
        self.lengths = lengths.reshape(-1, size).sum(1)  # what packing reads: a unit's tokens

    def __len__(self) -> int:
        return len(self.samples) // self.size

    def __getitem__(self, index: int) -> list[Encoded]:
        if not 0 <= index < len(self):
            raise IndexError(f"unit {index} of {len(self)}")
        return [self.samples[index * self.size + k] for k in range(self.size)]

    def __iter__(self) -> Iterator[list[Encoded]]:
        return (self[i] for i in range(len(self)))


class UnitCollator:
    """Batches of units: every sample its own row, or (``packed``) the units of a row side by side.

    Sequences are numbered in order: a ``PairBatch`` (units of two) or an ``UnpairedBatch`` (KTO samples).
    """

    def __init__(self, pad_id: int, packed: bool) -> None:
        self.collate = Collator(pad_id)
        self.packed = packed

    def __call__(self, items: Iterable) -> UnitBatch:
        if self.packed:  # items: rows, each a list of units
            rows = [[s for unit in row for s in unit] for row in items]
            batch = self.collate(rows)
            samples = [s for row in rows for s in row]
        else:  # items: units
            samples = [s for unit in items for s in unit]
            batch = self.collate(samples)
        values = [np.nan if s.value is None else s.value for s in samples]
        unit_size = len(items[0]) if not self.packed else len(items[0][0])
        return extended(
            batch,
            PairBatch if unit_size == 2 else UnpairedBatch,
            sequence_values=torch.tensor(values, dtype=torch.float32),
            sequence_shas=[s.sha for s in samples],
        )
