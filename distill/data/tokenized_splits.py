"""The tokenized-data cache side of ``DataModule``: what each split's cache entry is keyed by, and the
splits mapped from there, encoded (once, in ``num_proc`` processes) where the cache lacks them."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from distill.data.chunks import EncodedChunk, encode_chunks
from distill.data.encoding import EncodingStats, check_some_trainable
from distill.data.formats import Record, Source, find_files
from distill.data.hf_datasets import DatasetSplit
from distill.data.templates import ChatTemplate, TemplateError, resolve_template
from distill.data.tokenized import (
    TokenizedEntry,
    TokenizedSamples,
    file_digest,
    split_identity,
    tokenizer_fingerprint,
)
from distill.progress import Progress


class TokenizedSplits:
    """Part of ``DataModule`` (its options and ``load_records``/``template_for``): a subclass reading
    other records overrides ``records_kind``, ``encode_split`` and ``entry_meta``."""

    records_kind = "samples"  # keys the tokenized cache: other record kinds encode the same files otherwise

    def split_inputs(self) -> dict[str, dict]:
        """What each split's tokenized cache entry is keyed by (train, and val when there is one)."""
        try:
            template = resolve_template(self.tokenizer, self.template_name, self.end_of_turn)
            chat = [template.source, template.end_of_turn, template.tool_role]
        except TemplateError:  # no template: fine while no record is a conversation
            chat = ["unresolved", self.template_name, self.end_of_turn]
        common = {
            "records": self.records_kind,
            "format": self.format,
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "template": chat,
            "max_seq_length": self.max_seq_length,
            "truncation": self.truncation,
            "train_on_responses_only": self.train_on_responses_only,
        }

        def entry(files: list, take: int | None, **split: Any) -> dict:
            return {**common, "files": files, **split, "take": take}

        val = {}
        if self.val_sources:
            val = {"val": entry(_file_identities(self.val_sources), self.max_eval_samples)}
        if not self.trains_on_files:  # a stream (or sampled rounds): the training files are never encoded
            return val
        train = _file_identities(self.train_sources)
        if self.val_sources or self.val_fraction <= 0:
            return {"train": entry(train, self.max_train_samples), **val}
        held_out = {"val_fraction": self.val_fraction, "seed": self.seed}
        return {
            "train": entry(train, self.max_train_samples, split={**held_out, "part": "train"}),
            "val": entry(train, self.max_eval_samples, split={**held_out, "part": "val"}),
        }

    def tokenized_splits(self) -> dict[str, TokenizedSamples]:
        """Each split's samples from the tokenized cache, encoding (once, under the entry's lock) the
        splits it does not hold yet. Kept: ``prepare_data`` and ``setup`` in one process hash the files
        once."""
        if self._splits is not None:
            return self._splits
        entries = {
            split: TokenizedEntry(self.tokenized_cache, inputs)
            for split, inputs in self.split_inputs().items()
        }
        opened = {split: entry.open() for split, entry in entries.items()}
        missing = [split for split, samples in opened.items() if samples is None]
        if missing:
            with ExitStack() as locks:
                # each entry once: splits of the same files (train_files == val_files) share one
                for entry in {entries[split].path: entries[split] for split in missing}.values():
                    locks.enter_context(entry.lock())
                # another run may have built them while we waited for the locks
                opened.update({split: entries[split].open() for split in missing})
                todo = [split for split in missing if opened[split] is None]
                if todo:
                    records = dict(zip(("train", "val"), self.load_records(), strict=True))
                    for split in todo:
                        opened[split] = entries[split].open()  # built above for a split it shares
                        if opened[split] is None:
                            self.build_split(entries[split], split, records[split])
                            opened[split] = entries[split].open()
        self._splits = opened
        return opened

    def encode_split(self, records: list[Record], template: ChatTemplate | None) -> Iterable[EncodedChunk]:
        """The records encoded, truncated and filtered, chunk by chunk (in ``num_proc`` processes)."""
        return encode_chunks(
            records,
            self.tokenizer,
            template,
            self.max_seq_length,
            self.truncation,
            self.train_on_responses_only,
            self.num_proc,
        )

    def entry_meta(self, split: str, records: list[Record], template: ChatTemplate | None) -> dict:
        """What a tokenized cache entry records about its samples besides the counts."""
        return {"conversations": template is not None}

    def build_split(self, entry: TokenizedEntry, split: str, records: list[Record]) -> None:
        template = self.template_for(records)
        chunks = self.encode_split(records, template)
        total = EncodingStats()
        with Progress(len(records), f"encoding {split} records", "records") as progress:

            def counted():
                for chunk in chunks:
                    progress.update(chunk.stats.samples)
                    total.add(chunk.stats)
                    yield chunk
                # before the entry is finished: a fully masked dataset is refused at every start
                check_some_trainable(total, self.tokenizer, self.max_seq_length)

            entry.build(counted(), self.entry_meta(split, records, template))
        if total.dropped_too_long:  # named once, where they are dropped: the cache keeps the counts only
            rank_zero_warn(
                f"[distill] {split}: dropped {total.dropped_too_long} of {total.samples} records that do not "
                f"fit data.max_seq_length={self.max_seq_length} (truncation '{self.truncation}'; first: "
                f"{', '.join(total.too_long)}): raise data.max_seq_length to keep them"
            )


def _file_identities(sources: list[Source]) -> list:
    """(resolved path, SHA-256 of the bytes) of every data file, and each dataset split's identity
    (name, config, split, content fingerprint): any edit changes the cache key."""
    return [
        split_identity(found)
        if isinstance(found, DatasetSplit)
        else (str(found.resolve()), file_digest(found))
        for source in sources
        for found in find_files(source)
    ]
