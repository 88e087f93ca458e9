"""Encoding at scale: records encoded in chunks, in parallel processes, each chunk returned as flat
arrays (what the tokenized cache writes, and cheap to send between processes)."""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from distill.data.encoding import IGNORE_INDEX, Encoded, EncodingStats, Truncation, encode_chunk
from distill.data.formats import Record
from distill.data.templates import ChatTemplate


@dataclass
class EncodedChunk:
    """Consecutive kept samples as flat arrays, with the counts of their records."""

    input_ids: np.ndarray  # int32, the samples' tokens concatenated
    trainable: np.ndarray  # bool, aligned with input_ids: the token is a training target
    lengths: np.ndarray  # int64, tokens per sample
    shas: list[str]
    sources: list[str]
    values: np.ndarray  # float32 per sample, NaN where it has none (``Encoded.value``)
    stats: EncodingStats

    @classmethod
    def of(cls, samples: list[Encoded], stats: EncodingStats) -> EncodedChunk:
        ids = [np.asarray(s.input_ids, np.int32) for s in samples]
        labels = [np.asarray(s.labels, np.int64) for s in samples]
        return cls(
            input_ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
            trainable=np.concatenate(labels) != IGNORE_INDEX if labels else np.zeros(0, bool),
            lengths=np.array([len(s.input_ids) for s in samples], np.int64),
            shas=[s.sha for s in samples],
            sources=[s.source for s in samples],
            values=np.array([np.nan if s.value is None else s.value for s in samples], np.float32),
            stats=stats,
        )

    def samples(self) -> list[Encoded]:
        bounds = np.concatenate([[0], np.cumsum(self.lengths)])
        labels = np.where(self.trainable, self.input_ids, IGNORE_INDEX)
        rows = zip(bounds[:-1], bounds[1:], self.shas, self.sources, self.values.tolist(), strict=True)
        return [
            Encoded(self.input_ids[a:b].tolist(), labels[a:b].tolist(), sha, source, value=stored_value(v))
            for a, b, sha, source, v in rows
        ]


def stored_value(stored: float) -> float | None:
    """``Encoded.value`` from its stored float (NaN: none)."""
    return None if math.isnan(stored) else stored


ChunkEncoder = Callable[[Sequence[Any]], EncodedChunk]
"""Encodes one chunk of records (picklable, as a module-level function or a ``partial`` of one: each
worker process receives it once)."""

_worker_encode: ChunkEncoder | None = None  # what an encoding worker runs on each chunk


def _init_worker(encode: ChunkEncoder) -> None:
    global _worker_encode
    # ``num_proc`` workers already use the cores: the tokenizers library's own threads would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encode = encode


def _encode_in_worker(records: Sequence[Any]) -> EncodedChunk:
    return _worker_encode(records)


def _encode(records: Sequence[Record], settings: tuple) -> EncodedChunk:
    kept, stats = encode_chunk(records, *settings)
    for sample in stats.examples_without_labels:  # the parent holds the records already
        sample.record = None
    return EncodedChunk.of(kept, stats)


def encode_chunks(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | None,
    max_length: int,
    truncation: Truncation = "right",
    train_on_responses_only: bool = True,
    num_proc: int = 1,
    chunk_size: int = 256,
) -> Iterator[EncodedChunk]:
    """``encode_chunk`` over consecutive chunks of ``records``, in order, in ``num_proc`` processes
    (``map_chunks``)."""
    settings = (tokenizer, template, max_length, truncation, train_on_responses_only)
    return map_chunks(records, partial(_encode, settings=settings), num_proc, chunk_size)


def map_chunks(
    records: Sequence[Any], encode: ChunkEncoder, num_proc: int = 1, chunk_size: int = 256
) -> Iterator[EncodedChunk]:
    """``encode`` over consecutive chunks of ``records``, in order, in ``num_proc`` processes.

    Workers fork from a fresh server process, never from this one: a fork of a process that has run
    torch (OpenMP) or has background threads can deadlock in the child. Each worker receives ``encode``
    (with the tokenizer and template it holds) once; only the chunks' records go out and flat arrays
    come back, so the results equal a serial run's. A worker that dies fails the build
    (``BrokenProcessPool``) instead of leaving it waiting.
    """
    chunks = [records[i : i + chunk_size] for i in range(0, len(records), chunk_size)]
    if num_proc <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield encode(chunk)
        return
    context = multiprocessing.get_context("forkserver")
    # the server imports this module (and transformers) once; every later pool forks ready workers
    context.set_forkserver_preload([__name__])
    others = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(
        min(num_proc, len(chunks)), mp_context=context, initializer=_init_worker, initargs=(encode,)
    )
    try:
        yield from pool.map(_encode_in_worker, chunks)
    except BaseException:
        # the pool's own clean-up after a dead worker can wait forever on a live one that never got its
        # stop sentinel (seen in CI: BrokenProcessPool raised, then shutdown hung): the workers go first
        for worker in set(multiprocessing.active_children()) - others:
            worker.kill()
        raise
    finally:
        pool.shutdown(cancel_futures=True)
