"""Reading a teacher cache: one SHA-sorted index per teacher over every committed segment, random and
chunked access through a bounded set of open files, reopened after fork, every read checked.

An open reader of a directory holds the shared readers lock (``distill.cache.lock``), so the segments
it indexed stay on disk until it is closed, whatever compaction or pruning happens meanwhile.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from distill.cache.codec import decode_targets
from distill.cache.lock import hold_readers_lock
from distill.cache.segment import SPAN_FIELDS, CacheCorruptError, open_segment, scan_segments
from distill.targets import SparseTargets

MAX_ABS_LSE = 1e4  # raw-logit log-sum-exps of real models are tens; corrupt floats are far out


def sha_keys(shas: Iterable[str]) -> np.ndarray:
    return np.array(list(shas), dtype="S64")


@dataclass
class SampleIndex:
    """One teacher's samples over all segments, sorted by SHA for binary search; first copy wins."""

    sha: np.ndarray  # (N,) S64, sorted, unique
    seg: np.ndarray  # (N,) segment number
    pos: np.ndarray  # (N,) first position in the segment's per-position datasets
    npos: np.ndarray
    byte: np.ndarray  # (N,) first byte in the segment's stream
    nbytes: np.ndarray
    kl: np.ndarray  # (N,) KL summed over the sample's positions
    num_tokens: np.ndarray  # (N,) the sample's token count
    nll: np.ndarray  # (N,) teacher NLL of the actual next tokens, summed over positions; NaN: unknown
    order: np.ndarray  # (N,) rows of the sorted arrays in storage order
    duplicates: int = 0  # rows stored more than once (two writers collected the same sample)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (rows, found mask) for S64 keys."""
        rows = np.minimum(np.searchsorted(self.sha, keys), max(len(self.sha) - 1, 0))
        found = self.sha[rows] == keys if len(self.sha) else np.zeros(len(keys), dtype=bool)
        return rows, found


class CacheReader:
    """Random and chunked access to a cache directory (all segments of all ranks) or one segment file.

    At most ``max_open`` files open (least recently used closed first); pickles without its handles, so
    spawned workers can take it too. A failed read raises ``CacheCorruptError`` (``named_corruption``).
    """

    def __init__(self, path: str | Path, teacher: str | None = None, max_open: int = 16):
        self.path, self.teacher, self.max_open = Path(path), teacher, max_open
        self.segments: list[Path] = []
        self.formats: list[tuple[str, int, int]] = []  # (scheme, k, value_bits) per segment
        self.vocab_sizes: list[int] = []
        self._index: dict[str, SampleIndex] | None = None
        self.stored_positions = 0  # every row in the files, duplicates included: for bytes/position
        self._files: OrderedDict[int, h5py.File] = OrderedDict()
        self._pid: int | None = None
        self._readers_lock: int | None = None

    def _process(self) -> None:  # per process: own handles (inherited ones are unsafe) and lock hold
        if self._pid != os.getpid():
            self._files, self._pid = OrderedDict(), os.getpid()
            self._readers_lock = hold_readers_lock(self.path) if self.path.is_dir() else None

    def _file(self, seg: int) -> h5py.File:
        self._process()
        if seg in self._files:
            self._files.move_to_end(seg)
            return self._files[seg]
        while len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1].close()
        self._files[seg] = open_segment(self.segments[seg])
        return self._files[seg]

    def load_index(self) -> dict[str, SampleIndex]:
        if self._index is not None:
            return self._index
        self._process()  # the lock first: no segment listed below can be deleted before close()
        self.segments = [self.path] if self.path.is_file() else scan_segments(self.path)[0]
        parts: dict[str, list[tuple[np.ndarray, ...]]] = {}
        for s in range(len(self.segments)):
            f = self._file(s)
            self.formats.append((str(f.attrs["scheme"]), int(f.attrs["k"]), int(f.attrs["value_bits"])))
            self.vocab_sizes.append(int(f.attrs["vocab_size"]))
            for name, g in f["teachers"].items():
                with named_corruption(self.segments[s], name):
                    npos, nbytes = g["num_positions"][:].astype(np.int64), g["num_bytes"][:]
                    kl = g["kl"][:] if "kl" in g else np.zeros(len(npos))
                    nll = g["nll"][:] if "nll" in g else np.full(len(npos), np.nan)  # older segments
                    cols = (g["sha"][:], g["num_tokens"][:])
                pos, byte = np.cumsum(npos) - npos, np.cumsum(nbytes) - nbytes
                parts.setdefault(name, []).append(
                    (cols[0], np.full(len(npos), s), pos, npos, byte, nbytes, kl, cols[1], nll)
                )
                self.stored_positions += int(npos.sum())
        self._index = {}
        for name, chunks in parts.items():
            cols = [np.concatenate(c) for c in zip(*chunks, strict=True)]
            _, first = np.unique(cols[0], return_index=True)  # sorted by SHA; first occurrence kept
            duplicates = len(cols[0]) - len(first)
            self._index[name] = SampleIndex(*(c[first] for c in cols), np.argsort(first), duplicates)
        return self._index

    def teachers(self) -> list[str]:
        return sorted(self.load_index())

    def _names(self, teacher: str | None) -> list[str]:
        name = teacher or self.teacher
        if name is not None:
            if name not in self.load_index():
                raise KeyError(f"teacher {name!r} is not in the cache (has {self.teachers()})")
            return [name]
        return self.teachers()

    def shas(self, teacher: str | None = None) -> list[str]:
        """Samples stored for ``teacher``, or for every teacher when none is given, in storage order."""
        names = self._names(teacher)
        if not names:
            return []
        ix = self.load_index()[names[0]]
        keys = ix.sha[ix.order]
        for other in names[1:]:
            keys = keys[self.load_index()[other].find(keys)[1]]
        return [k.decode() for k in keys]

    def get(self, sha: str, teacher: str | None = None) -> SparseTargets:
        return self._read(self._one(teacher), [sha])[0]

    def num_tokens(self, shas: Sequence[str], teacher: str | None = None) -> list[int]:
        ix = self.load_index()[self._one(teacher)]
        return ix.num_tokens[ix.find(sha_keys(shas))[0]].tolist()

    def num_positions(self, shas: Sequence[str], teacher: str | None = None) -> np.ndarray:
        """Per sample, the number of positions stored for it."""
        name = self._one(teacher)
        return self.load_index()[name].npos[self._stored_rows(name, shas)]

    def nll(self, shas: Sequence[str], teacher: str | None = None) -> np.ndarray:
        """Per sample, the teacher's NLL of its next tokens summed over positions (NaN: older segment)."""
        name = self._one(teacher)
        return self.load_index()[name].nll[self._stored_rows(name, shas)]

    def read(self, shas: Sequence[str], teacher: str | None = None) -> list[SparseTargets]:
        """Several samples at once (one read per segment where they lie close together)."""
        return self._read(self._one(teacher), shas)

    def spans(self, shas: Sequence[str], teacher: str | None = None) -> list[np.ndarray]:
        """Per sample, its positions' (token, turn, start, end) in the text, (P, 4) int32: what a cache in
        the teacher's own terms keeps beside the targets (``distill.teacher.cross``)."""
        name = self._one(teacher)
        ix, rows = self.load_index()[name], self._stored_rows(name, shas)
        out = []
        for sha, row in zip(shas, rows, strict=True):
            seg, p0 = int(ix.seg[row]), int(ix.pos[row])
            g = self._file(seg)["teachers"][name]
            with named_corruption(self.segments[seg], name, [sha]):
                if "token" not in g:
                    raise ValueError("the segment holds no token places: not a cache in the teacher's terms")
                cols = [g[n][p0 : p0 + int(ix.npos[row])] for n in SPAN_FIELDS]
            out.append(np.stack(cols, axis=1).astype(np.int32))
        return out

    def iter_chunks(
        self, shas: Sequence[str], chunk_size: int, teacher: str | None = None
    ) -> Iterator[list[tuple[str, SparseTargets]]]:
        """``chunk_size`` samples at a time in the order given (fastest in storage order)."""
        name = self._one(teacher)
        for start in range(0, len(shas), chunk_size):
            chunk = list(shas[start : start + chunk_size])
            yield list(zip(chunk, self._read(name, chunk), strict=True))

    def _one(self, teacher: str | None) -> str:
        names = self._names(teacher)
        if len(names) != 1:
            raise ValueError(f"the cache has teachers {names}: say which one to read")
        return names[0]

    def _stored_rows(self, name: str, shas: Sequence[str]) -> np.ndarray:
        """Rows of ``shas`` in teacher ``name``'s index; KeyError naming one that is not stored."""
        rows, found = self.load_index()[name].find(sha_keys(shas))
        if not found.all():
            raise KeyError(
                f"{int((~found).sum())} samples not in the cache for teacher {name!r}, "
                f"e.g. {shas[int(np.argmin(found))]}"
            )
        return rows

    def _read(self, name: str, shas: Sequence[str]) -> list[SparseTargets]:
        ix = self.load_index()[name]
        rows = self._stored_rows(name, shas)
        out: list[SparseTargets | None] = [None] * len(rows)
        for seg in np.unique(ix.seg[rows]).tolist():
            sel = np.flatnonzero(ix.seg[rows] == seg)
            with named_corruption(self.segments[seg], name, [shas[i] for i in sel]):
                self._read_segment(seg, name, sel, rows[sel], out)
        return out  # type: ignore[return-value]

    def _read_segment(self, seg: int, name: str, sel: np.ndarray, r: np.ndarray, out: list) -> None:
        ix, g = self.load_index()[name], self._file(seg)["teachers"][name]
        tail = g.get("tail")
        p0, p1 = int(ix.pos[r].min()), int((ix.pos[r] + ix.npos[r]).max())
        b0, b1 = int(ix.byte[r].min()), int((ix.byte[r] + ix.nbytes[r]).max())
        if b1 - b0 <= 2 * int(ix.nbytes[r].sum()) + (1 << 20):  # close together: one read each
            lse, stream = g["lse"][p0:p1], g["stream"][b0:b1]
            tails = tail[p0:p1] if tail is not None else None
        else:
            p0 = b0 = 0
            lse, stream, tails = g["lse"], g["stream"], tail
        for i, row in zip(sel, r, strict=True):
            ps, bs = int(ix.pos[row]) - p0, int(ix.byte[row]) - b0
            pe, be = ps + int(ix.npos[row]), bs + int(ix.nbytes[row])
            sample_lse = np.asarray(lse[ps:pe])
            sample_tail = None if tails is None else np.asarray(tails[ps:pe])
            check_values(sample_lse, sample_tail)
            targets = decode_targets(np.asarray(stream[bs:be]), sample_lse, sample_tail, *self.formats[seg])
            check_ids(targets, self.vocab_sizes[seg])
            out[i] = targets

    def close(self) -> None:
        """Close the files and release the readers lock; a later read indexes the cache afresh."""
        for f in self._files.values():
            f.close()
        self._files = OrderedDict()
        if self._readers_lock is not None and self._pid == os.getpid():
            os.close(self._readers_lock)
        self._readers_lock, self._pid = None, None
        self._index, self.segments, self.formats, self.vocab_sizes = None, [], [], []
        self.stored_positions = 0

    def __del__(self) -> None:  # a reader dropped without close() must not hold the lock forever
        if getattr(self, "_pid", None) is not None:
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"], state["_pid"], state["_readers_lock"] = OrderedDict(), None, None
        return state


def check_values(lse: np.ndarray, tail: np.ndarray | None) -> None:
    """What a checksum cannot catch: values no teacher produces (a bad write, another program's bytes)."""
    if lse.size and not (np.isfinite(lse).all() and np.abs(lse).max() <= MAX_ABS_LSE):
        raise ValueError(f"log-sum-exp values out of range (max |lse| {np.nanmax(np.abs(lse)):.3g})")
    if tail is not None and tail.size and (np.isnan(tail).any() or tail.max() > 1e-2):
        raise ValueError("tail log-masses that are not log-probabilities")


def check_ids(targets: SparseTargets, vocab_size: int) -> None:
    for ids in (targets.ids, targets.sample_ids):
        if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"token ids outside the vocabulary [0, {vocab_size})")


@contextmanager
def named_corruption(segment: Path, teacher: str, shas: Sequence[str] = ()) -> Iterator[None]:
    """A failed read of ``segment`` (checksum, truncation, undecodable bytes, impossible values) becomes
    a CacheCorruptError naming the segment, the teacher and the samples being read."""
    try:
        yield
    except CacheCorruptError:
        raise
    except (OSError, ValueError, IndexError) as error:
        raise CacheCorruptError(segment, f"{type(error).__name__}: {error}", teacher, shas) from error
