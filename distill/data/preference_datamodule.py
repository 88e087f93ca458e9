"""PreferenceDataModule: preference pairs (DPO family, reward models) or KTO samples -> batches of units.

The records are read by ``distill.data.pairs``, encoded by ``distill.data.pair_encoding`` into the same
tokenized-data cache as SFT samples (a pair as two consecutive samples), and batched as units:
``batch_size`` counts pairs (or KTO samples), and shuffling, packing, rank sharding and resume move
whole units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from distill.data.batch import UnitBatch
from distill.data.batching import pack
from distill.data.chunks import EncodedChunk
from distill.data.datamodule import DataModule
from distill.data.encoding import Encoded
from distill.data.facts import DataFacts
from distill.data.formats import Source
from distill.data.pair_encoding import Grouped, UnitCollator, encode_unit_chunks
from distill.data.pairs import (
    PairFormat,
    PairReadStats,
    PairRecord,
    UnpairedRecord,
    read_pair_records,
    warn_identical_dropped,
)
from distill.data.templates import ChatTemplate


class PreferenceDataModule(DataModule):
    records_kind = "preference"

    def __init__(self, format: PairFormat = "auto", truncation: str = "left", **kwargs: Any) -> None:
        """
        Args:
            format: Record format (``medicalgpt``, ``medicalgpt_reward``, ``trl``, ``hh``, ``kto``), or
                ``auto`` to detect it per record. A file holds pairs or KTO samples, not both.
            truncation: ``left`` only: an over-long pair loses prompt tokens from the left, the same
                number from both responses, which stay whole.
            **kwargs: Everything ``DataModule`` takes (files, template, max_seq_length, packing,
                ...). ``batch_size`` counts pairs (KTO samples), or packed rows with ``packing``;
                packed rows hold up to twice ``max_seq_length`` tokens, so a pair whose responses
                each fit always fits one row.
        """
        if kwargs.get("streaming"):
            raise ValueError("data.streaming reads plain text for pretraining; preference data is read whole")
        if kwargs.get("train_on_responses_only") is False:
            raise ValueError(
                "preference objectives score the responses: train_on_responses_only must stay true"
            )
        if truncation != "left":
            raise ValueError(
                f"data.truncation {truncation!r}: preference data cuts an over-long pair from the left of "
                "its prompt, so that both responses stay whole and comparable; set truncation: left (or "
                "leave it out), or raise max_seq_length"
            )
        super().__init__(format="auto", truncation=truncation, **kwargs)
        self.format = format
        # what reading each list of files dropped, kept in the entries built from it: a later run that
        # maps the entries warns from there, as reading the files did
        self._read_stats: dict[tuple[str, ...], PairReadStats] = {}

    def read_files(self, files: list[Source]) -> list[PairRecord | UnpairedRecord]:
        records, stats = read_pair_records(files, self.format)
        self._read_stats[tuple(map(str, files))] = stats
        return records

    def template_for(self, records: list) -> ChatTemplate:
        return self.resolve_chat_template()

    def encode_split(self, records: list, template: ChatTemplate | None) -> Iterable[EncodedChunk]:
        return encode_unit_chunks(records, self.tokenizer, template, self.max_seq_length, self.num_proc)

    def entry_meta(self, split: str, records: list, template: ChatTemplate | None) -> dict:
        kinds = {type(record) for record in records}
        if len(kinds) > 1:  # units of two sizes in one entry could not be told apart
            raise ValueError("the data files mix preference pairs and KTO samples: use one kind")
        unit_size = 1 if kinds == {UnpairedRecord} else 2
        files = self.val_sources if split == "val" and self.val_sources else self.train_sources
        read = self._read_stats[tuple(map(str, files))]
        return {
            **super().entry_meta(split, records, template),
            "unit_size": unit_size,
            "identical_dropped": [read.identical_dropped, read.identical_first],
        }

    def _warn_identical_dropped_from_cache(self) -> None:
        """The "chosen equals rejected" warning of a run whose entries were all mapped, not built: it
        read no file, so the count comes from the entries (once per list of files)."""
        if self._read_stats or rank_zero_only.rank != 0:  # reading the files has warned already
            return
        warned = set()
        for samples in self.tokenized_splits().values():
            count, first = samples.meta.get("identical_dropped", [0, []])
            if count and (count, tuple(first)) not in warned:
                warned.add((count, tuple(first)))
                warn_identical_dropped(count, first, f"the tokenized cache entry {samples.directory.parent}")

    def setup(self, stage: str) -> None:
        if self._set_up:
            return
        super().setup(stage)
        splits = self.tokenized_splits()
        self._warn_identical_dropped_from_cache()
        sizes = {samples.meta["unit_size"] for samples in splits.values()}
        if len(sizes) > 1:
            raise ValueError(
                "the training and validation files mix preference pairs and KTO samples: use one kind"
            )
        self.unit_size = sizes.pop() if sizes else 2
        self.train = Grouped(self.train, self.unit_size)
        self.val = Grouped(self.val, self.unit_size)

    @property
    def collator(self) -> Callable[[list], UnitBatch]:
        return UnitCollator(self.pad_id, packed=self.packing)

    @property
    def unpacked_collator(self) -> Callable[[list], UnitBatch]:
        return UnitCollator(self.pad_id, packed=False)

    def facts(self) -> DataFacts:
        kind = "pairs" if self.unit_size == 2 else "unpaired"
        return replace(super().facts(), batches=kind, units=self)

    def identity(self) -> list[str]:
        """What the encoded units are a function of: the tokenized-cache entries of the splits (keyed by
        the files, the tokenizer, the template and the truncation)."""
        return sorted(samples.directory.parent.name for samples in self.tokenized_splits().values())

    def unit_count(self, rank: int, world_size: int) -> int:
        """How many units ``unit_batches(rank, world_size)`` yields."""
        return len(self._units(rank, world_size))

    def unit_batches(self, rank: int, world_size: int) -> Iterator[UnitBatch]:
        """Rank ``rank``'s share of every training and validation unit, once each, in unpacked batches
        of ``eval_batch_size`` units (read batch by batch)."""
        units, collate = self._units(rank, world_size), self.unpacked_collator
        for start in range(0, len(units), self.eval_batch_size):
            yield collate([split[i] for split, i in units[start : start + self.eval_batch_size]])

    def _units(self, rank: int, world_size: int) -> list[tuple[Sequence, int]]:
        return [(split, i) for split in (self.train, self.val) for i in range(len(split))][rank::world_size]

    def _rows(self, samples: Sequence[Encoded], shuffle_seed: int | None) -> Sequence:
        return pack(samples, 2 * self.max_seq_length, shuffle_seed) if self.packing else samples
