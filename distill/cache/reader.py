"""Reading a teacher cache: one SHA-sorted index per teacher over every committed segment, random and
chunked access, handles reopened after fork."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from distill.cache import codec
from distill.cache.segment import open_segment, scan_segments
from distill.targets import SparseTargets


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
    order: np.ndarray  # (N,) rows of the sorted arrays in storage order

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (rows, found mask) for S64 keys."""
        rows = np.minimum(np.searchsorted(self.sha, keys), max(len(self.sha) - 1, 0))
        found = self.sha[rows] == keys if len(self.sha) else np.zeros(len(keys), dtype=bool)
        return rows, found


class CacheReader:
    """Random and chunked access to a cache directory (all segments of all ranks) or one segment file.

    Opens files lazily and reopens them in a forked process (DataLoader workers); pickles without its
    h5py handles, so it can be handed to spawned workers too.
    """

    def __init__(self, path: str | Path, teacher: str | None = None):
        self.path = Path(path)
        self.teacher = teacher
        self.segments: list[Path] = []
        self.formats: list[tuple[str, int, int]] = []  # (scheme, k, value_bits) per segment
        self._index: dict[str, SampleIndex] | None = None
        self.stored_positions = 0  # every row in the files, duplicates included: for bytes/position
        self._files: dict[int, h5py.File] = {}
        self._pid: int | None = None

    def _file(self, seg: int) -> h5py.File:
        if self._pid != os.getpid():  # handles inherited through fork are not safe to share
            self._files, self._pid = {}, os.getpid()
        if seg not in self._files:
            self._files[seg] = open_segment(self.segments[seg])
        return self._files[seg]

    def load_index(self) -> dict[str, SampleIndex]:
        if self._index is not None:
            return self._index
        self.segments = [self.path] if self.path.is_file() else scan_segments(self.path)[0]
        parts: dict[str, list[tuple[np.ndarray, ...]]] = {}
        for s in range(len(self.segments)):
            f = self._file(s)
            self.formats.append((str(f.attrs["scheme"]), int(f.attrs["k"]), int(f.attrs["value_bits"])))
            for name, g in f["teachers"].items():
                npos, nbytes = g["num_positions"][:].astype(np.int64), g["num_bytes"][:]
                kl = g["kl"][:] if "kl" in g else np.zeros(len(npos))
                pos, byte = np.cumsum(npos) - npos, np.cumsum(nbytes) - nbytes
                parts.setdefault(name, []).append(
                    (g["sha"][:], np.full(len(npos), s), pos, npos, byte, nbytes, kl, g["num_tokens"][:])
                )
                self.stored_positions += int(npos.sum())
        self._index = {}
        for name, chunks in parts.items():
            cols = [np.concatenate(c) for c in zip(*chunks, strict=True)]
            _, first = np.unique(cols[0], return_index=True)  # sorted by SHA; first occurrence kept
            self._index[name] = SampleIndex(*(c[first] for c in cols), order=np.argsort(first))
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

    def __len__(self) -> int:
        return len(self.shas())

    def __contains__(self, sha: str) -> bool:
        names = self._names(None)
        return bool(names) and all(self.load_index()[n].find(sha_keys([sha]))[1][0] for n in names)

    def get(self, sha: str, teacher: str | None = None) -> SparseTargets:
        return self._read(self._one(teacher), [sha])[0]

    def num_tokens(self, shas: Sequence[str], teacher: str | None = None) -> list[int]:
        """The stored samples' token counts."""
        ix = self.load_index()[self._one(teacher)]
        return ix.num_tokens[ix.find(sha_keys(shas))[0]].tolist()

    def read(self, shas: Sequence[str], teacher: str | None = None) -> list[SparseTargets]:
        """Several samples at once (one read per segment where they lie close together)."""
        return self._read(self._one(teacher), shas)

    def iter_chunks(
        self, shas: Sequence[str], chunk_size: int, teacher: str | None = None
    ) -> Iterator[list[tuple[str, SparseTargets]]]:
        """Yield ``chunk_size`` samples at a time in the order given, reading one span per segment and
        chunk where the samples lie close together (they do when ``shas`` follows storage order)."""
        name = self._one(teacher)
        for start in range(0, len(shas), chunk_size):
            chunk = list(shas[start : start + chunk_size])
            yield list(zip(chunk, self._read(name, chunk), strict=True))

    def _one(self, teacher: str | None) -> str:
        names = self._names(teacher)
        if len(names) != 1:
            raise ValueError(f"the cache has teachers {names}: say which one to read")
        return names[0]

    def _read(self, name: str, shas: Sequence[str]) -> list[SparseTargets]:
        ix = self.load_index()[name]
        rows, found = ix.find(sha_keys(shas))
        if not found.all():
            raise KeyError(
                f"{int((~found).sum())} samples not in the cache for teacher {name!r}, "
                f"e.g. {shas[int(np.argmin(found))]}"
            )
        out: list[SparseTargets | None] = [None] * len(rows)
        for seg in np.unique(ix.seg[rows]):
            sel = np.flatnonzero(ix.seg[rows] == seg)
            r = rows[sel]
            g = self._file(int(seg))["teachers"][name]
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
                out[i] = codec.decode_targets(
                    np.asarray(stream[bs:be]),
                    np.asarray(lse[ps:pe]),
                    None if tails is None else np.asarray(tails[ps:pe]),
                    *self.formats[int(seg)],
                )
        return out  # type: ignore[return-value]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state
