"""Streaming pretraining data: text corpora larger than memory -> rows of exactly ``max_length`` tokens,
sharded over ranks x DataLoader workers, endless, resumable at the exact next row (docs/data.md,
"Streaming corpora", has the sharding, packing and resume rules).

Line files are read from a byte offset, tables and datasets Arrow batch by batch from a row, never whole;
a bad line or row stops the stream with ``DataFormatError`` naming it, as ``distill.data.formats`` does.
A batch is what ``batching.Collator`` makes of packed rows (``packed_batch``). Each batch comes with
its shard's ``Cursor`` (taken by ``StreamingLoader`` in the main process), whose state holds each shard's
cursor after the last batch the fit *trained* (Lightning and the workers fetch ahead), gathered from all
ranks since a checkpoint keeps rank 0's loader state only. Every iteration starts after the batches trained so
far: after a resume, and in each new epoch of a fit cut into epochs (``trainer.limit_train_batches``).
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from distill.data.batch import TokenBatch
from distill.data.encoding import IGNORE_INDEX
from distill.data.formats import (
    BOM,
    DataFormatError,
    decode_line,
    detect_format,
    malformed,
    naming_undecodable,
    to_record,
)
from distill.data.hf_datasets import TABLE_BUILDERS, DatasetSplit, arrow_batches, as_list, row_at, row_where
from distill.data.resume import epoch_rng, leave_sigterm_to_main

LINE_SUFFIXES = (".jsonl", ".txt")
SUFFIXES = (*LINE_SUFFIXES, *TABLE_BUILDERS)
_TABLES = ", ".join(TABLE_BUILDERS)


class Cursor(NamedTuple):
    """Where a shard resumes: in pass ``pass_no``, the ``file``-th file of that pass's order at byte
    ``offset``, which starts its line ``line + 1`` (a table or dataset: at row ``offset``, and ``line`` is
    the same); ``doc`` is the pass's index of the next document from there, of which ``skip`` tokens were
    already trained."""

    pass_no: int = 0
    file: int = 0
    offset: int = 0
    line: int = 0
    doc: int = 0
    skip: int = 0


Stream = Path | DatasetSplit


def stream_files(sources: str | Stream | list[str | Stream]) -> list[Stream]:
    """The ``SUFFIXES`` files of ``sources`` (files, or directories searched recursively) and their
    dataset splits."""
    files: list[Stream] = []
    for source in as_list(sources):
        if isinstance(source, DatasetSplit):
            files.append(source)
            continue
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"{path}: directory has no .jsonl or .txt files (nor {_TABLES})")
            files += found
        elif not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file or directory")
        elif path.suffix not in SUFFIXES:
            raise DataFormatError(
                f"{path}: streaming reads .jsonl and .txt files, line by line, and {_TABLES} ones, row by row"
            )
        else:
            files.append(path)
    return files


def require_max_steps(max_steps: int | None) -> None:
    """The stream is endless: a fit on it must end at ``trainer.max_steps``."""
    if max_steps is None or max_steps < 0:
        raise ValueError(
            "streaming data is endless (a shard at the end of the corpus starts a new pass): "
            "set trainer.max_steps to bound the fit"
        )


def document_text(line: str, suffix: str, where: str) -> str:
    """The text of one line: a ``.txt`` line itself, a JSONL line's ``text`` record."""
    if suffix == ".txt":
        return line.rstrip("\r\n")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise malformed(where, err) from None
    return record_text(value, where)


def record_text(value: object, where: str) -> str:
    """The text of a ``{"text"}`` record (a JSONL line's, a table row's)."""
    kind = detect_format(value) if isinstance(value, dict) else None
    if kind not in (None, "text"):
        raise DataFormatError(
            f'{where}: a {kind} record, but streaming is for text corpora ({{"text": ...}} records '
            "or .txt lines); train on conversations without streaming"
        )
    return to_record(value, where, "text").text or ""


class StreamingRows(IterableDataset):
    """Endless collated batches of ``batch_size`` rows of ``max_length`` tokens from one shard of the
    corpus per DataLoader worker; ``workers``, ``first`` and ``cursors`` are set by ``StreamingLoader``."""

    def __init__(
        self,
        files: str | Path | list[str | Path],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        docs_per_call: int = 256,
    ) -> None:
        """``seed``: the order of the files in each pass; ``docs_per_call``: documents per tokenizer call."""
        self.files = stream_files(files)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.docs_per_call = docs_per_call
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.workers = 1
        self.first = 0  # the local shard that worker 0 reads (the next one after the trained batches)
        self.cursors: dict[int, Cursor] = {}  # global shard -> where it starts

    def file_order(self, pass_no: int) -> list[int]:
        order = list(range(len(self.files)))
        epoch_rng(self.seed, pass_no).shuffle(order)
        return order

    def documents(self, shard: int, at: Cursor) -> Iterator[tuple[str, Cursor, Cursor]]:
        """Shard ``shard``'s documents from ``at`` on, endlessly: (text, cursor at it, cursor after it)."""
        shards = self.world_size * self.workers
        pass_no, first_file, offset, line, doc = at[:5]
        while True:
            whole_pass, found = (first_file, offset) == (0, 0), False
            order = self.file_order(pass_no)
            for position in range(first_file, len(order)):
                source = self.files[order[position]]
                units = _lines(source, offset, line) if _by_line(source) else _rows(source, offset)
                for next_offset, next_line, read in units:
                    start = Cursor(pass_no, position, offset, line, doc)
                    offset, line = next_offset, next_line
                    if read is None:  # a blank line
                        continue
                    doc += 1
                    if start.doc % shards == shard:
                        found = True
                        yield read(), start, Cursor(pass_no, position, offset, line, doc)
                offset = line = 0
            if whole_pass and not found:
                raise ValueError(
                    f"shard {shard} got no document: the corpus ({len(self.files)} files) has {doc} "
                    f"documents, fewer than world_size x num_workers = {shards} shards"
                )
            pass_no, first_file, doc = pass_no + 1, 0, 0

    def rows(self, shard: int, at: Cursor) -> Iterator[tuple[list[int], list[int], Cursor]]:
        """Full rows of the shard from ``at`` on: (tokens, lengths of its pieces, cursor after the row)."""
        documents = self.documents(shard, at)
        tokens: list[int] = []
        lengths: list[int] = []
        skip = at.skip
        while chunk := list(islice(documents, self.docs_per_call)):
            texts = [text for text, _, _ in chunk]
            encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
            for (_, start, after), body in zip(chunk, encoded["input_ids"], strict=True):
                ids = self.bos + body + self.eos
                while skip < len(ids):
                    piece = ids[skip : skip + self.max_length - len(tokens)]
                    tokens += piece
                    lengths.append(len(piece))
                    skip += len(piece)
                    if len(tokens) == self.max_length:
                        yield tokens, lengths, start._replace(skip=skip) if skip < len(ids) else after
                        tokens, lengths = [], []
                skip = 0

    def __iter__(self) -> Iterator[tuple[TokenBatch, dict[str, Any]]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if workers != self.workers:
            raise RuntimeError(
                f"StreamingRows set up for {self.workers} workers runs in {workers}: iterate it through "
                "StreamingLoader"
            )
        shard = self.rank * workers + (worker + self.first) % workers
        rows = self.rows(shard, self.cursors.get(shard, Cursor()))
        while True:
            batch = [next(rows) for _ in range(self.batch_size)]
            collated = packed_batch([tokens for tokens, _, _ in batch], [n for _, ns, _ in batch for n in ns])
            yield collated, {"shard": shard, "cursor": tuple(batch[-1][2])}


def packed_batch(rows: list[list[int]], lengths: list[int]) -> TokenBatch:
    """Full rows of pieces (``lengths``, row after row) as ``batching.Collator`` packs them, in a few
    tensor operations instead of several per piece: position ids restart at each piece, whose first
    token is no target."""
    input_ids = torch.tensor(rows, dtype=torch.long)  # (B, L)
    sizes = torch.tensor(lengths)
    starts = sizes.cumsum(0) - sizes  # of each piece in the flattened batch
    start_of = torch.zeros(input_ids.numel(), dtype=torch.long)
    start_of[starts] = starts
    # the start of the piece at each position (repeat_interleave takes ms here)
    position_ids = torch.arange(input_ids.numel()) - start_of.cummax(0).values
    labels = input_ids.flatten().clone()
    labels[starts] = IGNORE_INDEX
    first = torch.zeros(input_ids.numel(), dtype=torch.long)
    first[starts] = 1
    return TokenBatch(
        input_ids=input_ids,
        labels=labels.view_as(input_ids),
        position_ids=position_ids.view_as(input_ids),
        sequence_index=(first.cumsum(0) - 1).view_as(input_ids),  # the piece of each token
    )


class StreamingLoader(DataLoader):
    """A DataLoader over ``StreamingRows`` whose checkpointed state is each shard's cursor after the
    batches the fit trained, so a resumed fit continues at the exact next row."""

    def __init__(
        self,
        stream: StreamingRows,
        progress: Callable[[], int],
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        """``progress()``: the batches the fit trained so far, over all its epochs
        (``resume.trained_batches``)."""
        if kwargs.get("persistent_workers"):  # they would keep the cursors they started from
            raise ValueError("StreamingLoader starts its workers at each iteration: no persistent_workers")
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, worker_init_fn=_init_worker, **kwargs
        )
        stream.workers = max(num_workers, 1)
        self.progress = progress
        self._trained = self._local({})  # each shard's cursor after the batches trained
        self._count = 0  # batches trained, whose cursors are in _trained
        self._pending: deque[tuple[int, int, Cursor]] = deque()  # (batch index, shard, cursor) pulled

    @property
    def layout(self) -> dict[str, Any]:
        """What the cursors mean something under: the shards, the row length, the files and their order."""
        stream = self.dataset
        names = [str(source) if isinstance(source, DatasetSplit) else source.name for source in stream.files]
        return {
            "seed": stream.seed,
            "world_size": stream.world_size,
            "num_workers": stream.workers,
            "max_length": stream.max_length,
            "files": names,
        }

    def _local(self, cursors: dict[int, Cursor]) -> dict[int, Cursor]:
        first = self.dataset.rank * self.dataset.workers
        return {g: cursors.get(g, Cursor()) for g in range(first, first + self.dataset.workers)}

    def __iter__(self) -> Iterator[TokenBatch]:
        # after the batches trained so far: those of the epochs before (a new epoch goes on with the
        # stream), or those of a checkpoint; the ones pulled beyond them were never trained
        index = self._commit()
        self.dataset.first, self.dataset.cursors = index % self.dataset.workers, dict(self._trained)
        self._pending = deque()
        batches = super().__iter__()
        try:
            for batch, where in batches:  # StreamingRows yields each batch with its shard's cursor after it
                self._pending.append((index, where["shard"], Cursor(*where["cursor"])))
                index += 1
                self._commit()  # the pending ones are those fetched ahead: a few
                yield batch
        finally:
            # now, while its queues live: after an error the iterator is freed by the garbage collector,
            # which may close the queues first, and the workers (deaf to SIGTERM) would never hear the stop
            getattr(batches, "_shutdown_workers", lambda: None)()

    def _commit(self) -> int:
        """The cursors of the batches trained by now become the state; returns their count."""
        trained = self.progress()
        while self._pending and self._pending[0][0] < trained:
            index, shard, cursor = self._pending.popleft()
            self._trained[shard], self._count = cursor, index + 1
        return self._count

    def state_dict(self) -> dict[str, Any]:
        trained = self._commit()
        # plain tuples: a checkpoint loads with weights_only
        cursors = _all_ranks({g: tuple(c) for g, c in self._trained.items()})
        return {**self.layout, "batches": trained, "cursors": cursors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, now = {k: state.get(k) for k in self.layout}, self.layout
        if saved != now:
            changed = "; ".join(f"{k} {saved[k]} -> {v}" for k, v in now.items() if saved[k] != v)
            raise ValueError(
                f"cannot resume the data stream: {changed} since the checkpoint. Documents are dealt to "
                "world_size x num_workers shards and the cursors point into these files: resume with "
                "the same devices, nodes, data.num_workers, max_seq_length, seed and files"
            )
        cursors = {int(g): Cursor(*c) for g, c in state["cursors"].items()}
        missing = sorted(set(self._local({})) - set(cursors))
        if missing:
            raise ValueError(f"the saved data stream state has no cursor for shards {missing}")
        self._trained, self._count, self._pending = self._local(cursors), state["batches"], deque()
        rank_zero_info(f"[distill] resuming the data stream after {state['batches']} batches")


# (offset after the unit, line after it, reads its text; None: no document)
Units = Iterator[tuple[int, int, Callable[[], str] | None]]


def _by_line(source: Stream) -> bool:
    return isinstance(source, Path) and source.suffix in LINE_SUFFIXES


def _lines(path: Path, offset: int, line: int) -> Units:
    """The lines of a ``.jsonl``/``.txt`` file from byte ``offset`` (line ``line + 1``) on; a line's text
    is decoded only when its shard reads it."""
    with path.open("rb", buffering=1 << 20) as handle:
        handle.seek(offset)
        for raw in handle:
            content = raw.removeprefix(BOM) if offset == 0 else raw
            start = offset + len(raw) - len(content)
            offset, line = offset + len(raw), line + 1
            if not content or content.isspace():
                yield offset, line, None
            else:
                yield (
                    offset,
                    line,
                    lambda c=content, n=line, at=start: document_text(
                        decode_line(c, path, n, at), path.suffix, f"{path}:{n}"
                    ),
                )


def _rows(source: Stream, row: int) -> Units:
    """The rows of a table file or a dataset split from row ``row`` on (``datasets`` streams them); a
    row is turned into Python only when its shard reads it."""
    with naming_undecodable(source):
        for table in arrow_batches(source, row, streaming=True):
            for index in range(table.num_rows):
                row += 1
                yield (
                    row,
                    row,
                    lambda t=table, i=index, n=row - 1: record_text(row_at(t, i), row_where(source, n)),
                )


def _init_worker(worker_id: int) -> None:
    """Workers leave SIGTERM to the main process and tokenize serially: they are the parallelism, and a
    tokenizer whose thread pool ran before the fork (``TOKENIZERS_PARALLELISM=true``) hangs in a child."""
    leave_sigterm_to_main(worker_id)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _all_ranks(cursors: dict[int, tuple[int, ...]]) -> dict[int, tuple[int, ...]]:
    """Every rank's cursors (a collective: Lightning takes the loader state on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cursors
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, cursors)
    return {g: c for part in gathered for g, c in part.items()}
