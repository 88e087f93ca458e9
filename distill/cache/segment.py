"""Segment files of the HDF5 teacher cache (``docs/cache.md``: schema, crash safety, sizes).

A writer fills a hidden ``.NAME.partial`` file and commits it by closing, fsyncing and renaming it to
``NAME.h5``; readers only ever see committed segments, so a crash loses at most the uncommitted file.
Compaction writes a new segment whose ``replaces`` attribute names the segments it supersedes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from distill.cache.codec import EncodedSample, encode_targets
from distill.cache.spec import CacheSpec
from distill.targets import SparseTargets

ENCODING = "rice-gap-ids;cbrt-rice-values;f32-lse;f16-tail-logmass"
_LIBVER = ("v110", "v110")  # extensible-array chunk index, still readable by HDF5 >= 1.10
# name: (dtype, chunk length, shuffle). Per-sample index, per-position floats, per-sample byte stream.
_FIELDS = {
    "sha": ("S64", 1024, False),
    "num_tokens": ("i4", 4096, True),
    "num_positions": ("i4", 4096, True),
    "num_bytes": ("i8", 4096, True),
    "kl": ("f8", 4096, True),
    "nll": ("f8", 4096, True),  # teacher -log p(actual next token) summed over the sample's positions
    "lse": ("f4", 16384, True),
    "tail": ("f2", 32768, True),
    "stream": ("u1", 65536, False),  # Rice bit streams: shuffling bytes of uint8 does nothing
    # caches in a teacher's own terms: each position's token and place in the text (distill.teacher.cross)
    "token": ("i4", 16384, True),
    "turn": ("i4", 16384, True),
    "start": ("i4", 16384, True),
    "end": ("i4", 16384, True),
}
SPAN_FIELDS = ("token", "turn", "start", "end")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename survives a crash once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves nothing behind
        raise
    fsync_path(path.parent)


class CacheSpaceError(OSError):
    """The disk holding a cache is full (or its quota is): a segment could not be written."""


class _PartialFile(io.FileIO):
    """A segment's ``.partial`` file under HDF5's ``fileobj`` driver, which keeps write errors from HDF5:
    HDF5 cannot close a file whose flush failed and the process then dies at exit (docs/cache.md, "Crash
    safety"). The first failed write or resize is kept in ``error`` and reported to HDF5 as done; the
    segment then discards the file and raises that error once HDF5 has let go of it."""

    error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):  # a write may store part of the bytes: the driver ignores counts
                    written = super().write(view[done:])
                    if not written:
                        raise OSError(errno.EIO, "the file system accepted no bytes")
                    done += written
            except OSError as error:
                self.error = error
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return super().truncate(size)
            except OSError as error:  # HDF5 extends the file to its end of allocation on close
                self.error = error
        return self.tell() if size is None else size


class Segment:
    """A segment file being written: fixed-size chunked datasets filled front to back, then committed
    by rename. Sizes are known before writing, so no chunk is ever rewritten (appending to resizable
    lzf datasets rewrites the last partial chunk and left ~7% of dead space in the file).

    Use it as a context manager: leaving the block without ``commit`` (an error, a full disk) closes
    and deletes the partial file; a full disk is then a ``CacheSpaceError`` naming the directory and
    the space the segment needed."""

    def __init__(
        self, directory: Path, prefix: str, spec: CacheSpec, samples: int, replaces: Sequence[str] = ()
    ):
        now = time.time_ns()  # names sort in commit order (the reader's storage order), are never reused
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}"
        # the name carries the number of samples: the one record of them that truncating or
        # overwriting the file cannot take, so `cache verify --repair` can say what a lost file held
        self.final = directory / f"{prefix}-{stamp}-{uuid.uuid4().hex[:8]}-n{samples}.h5"
        self.partial = directory / f".{self.final.name}.partial"
        self.nbytes = 0  # what the datasets hold before compression: about the space the file needs
        self._raw = _PartialFile(self.partial, "x+")
        try:
            # a chunk cache far above the chunk size keeps partly filled chunks in memory until complete
            self.file = h5py.File(self._raw, "w", libver=_LIBVER, rdcc_nbytes=16 << 20)
            for fl in fields(CacheSpec):
                if fl.name != "teachers":
                    self.file.attrs[fl.name] = getattr(spec, fl.name)
            self.file.attrs["encoding"] = ENCODING
            self.file.attrs["replaces"] = json.dumps(list(replaces))
            self.file.attrs["teachers"] = "[]"
        except BaseException:
            self._raw.close()
            self.partial.unlink(missing_ok=True)
            raise
        self.head = spec.scheme != "sampled"
        self.teacher_terms = spec.teacher_terms
        self._filled: dict[str, int] = {}

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if error is not None:
            self._discard(error)

    def group(self, identity: dict[str, str], rows: int, positions: int, nbytes: int) -> h5py.Group:
        g = self.file.create_group(f"teachers/{identity['name']}")
        g.attrs["teacher"] = json.dumps(identity, sort_keys=True)
        for name, (dtype, chunk, shuffle) in _FIELDS.items():
            if (self.head or name not in ("kl", "tail")) and (self.teacher_terms or name not in SPAN_FIELDS):
                per_position = name in ("lse", "tail", *SPAN_FIELDS)
                n = nbytes if name == "stream" else positions if per_position else rows
                # fletcher32: every chunk carries a checksum that HDF5 verifies on each read
                opts = {"chunks": (min(chunk, n),), "compression": "lzf", "shuffle": shuffle} if n else {}
                opts.update({"fletcher32": True} if n else {})
                g.create_dataset(name, shape=(n,), dtype=dtype, **opts)
                self.nbytes += n * np.dtype(dtype).itemsize
        self.file.attrs["teachers"] = json.dumps([*json.loads(self.file.attrs["teachers"]), identity])
        return g

    def write(self, g: h5py.Group, columns: dict[str, np.ndarray]) -> None:
        for name, data in columns.items():
            start = self._filled.get(g[name].name, 0)
            if len(data):
                g[name][start : start + len(data)] = data
            self._filled[g[name].name] = start + len(data)
        self._raise_write_error()  # a full disk ends the segment now, not after all of it was encoded

    def commit(self) -> Path:
        """Close, fsync, rename, fsync the directory: after this returns the segment survives a crash
        (even power loss, where the file system honours fsync); before it, readers never see it."""
        self.file.close()
        self._raise_write_error()
        os.fsync(self._raw.fileno())  # a network file system may report a full disk only here
        self._raw.close()
        os.replace(self.partial, self.final)
        fsync_path(self.final.parent)
        return self.final

    def _raise_write_error(self) -> None:
        if self._raw.error is not None:
            error = self._raw.error
            raise OSError(error.errno, error.strerror, str(self.partial)) from error

    def _discard(self, error: BaseException) -> None:
        """Let HDF5 go of the file, delete it, and say what a full disk needs."""
        # the file is deleted whatever state it was left in; failed writes were kept from HDF5, so
        # closing it cannot crash the process
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(OSError):
            self._raw.close()
        self.partial.unlink(missing_ok=True)
        cause = self._raw.error or error
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            directory = self.partial.parent
            free = shutil.disk_usage(directory).free
            raise CacheSpaceError(
                cause.errno,
                f"{directory}: no space left on its disk for the teacher cache: a segment of about "
                f"{_megabytes(self.nbytes)} could not be written and {_megabytes(free)} are free (the "
                f"unfinished segment was deleted). Make at least {_megabytes(self.nbytes)} free there (more "
                "for the samples still to collect) or put the cache on a larger disk, then rerun: the "
                "samples already committed are kept and only the rest is collected",
            ) from error
        if cause is not error:  # HDF5 failed on what a failed write left: the write is the news
            raise OSError(cause.errno, cause.strerror, str(self.partial)) from error


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


class CacheCorruptError(RuntimeError):
    """A segment's bytes fail their checksum, cannot be read or hold impossible values."""

    def __init__(self, segment: Path, problem: str, teacher: str | None = None, shas: Sequence[str] = ()):
        self.segment, self.teacher, self.shas = Path(segment), teacher, list(shas)
        which = f" teacher {teacher!r}," if teacher else ""
        samples = (
            f" samples {', '.join(self.shas[:4])}{' ...' if len(self.shas) > 4 else ''}," if shas else ""
        )
        super().__init__(
            f"corrupt teacher cache segment {segment}:{which}{samples} {problem}. To repair: "
            f"`python -m distill cache verify {self.segment.parent} --repair` removes the bad segment(s); "
            "the next fit or collect then recollects exactly their samples."
        )


class CacheWriter:
    """Collects one teacher's targets for a cache directory and commits them as segment files: one per
    ``commit``, every ``commit_bytes`` of encoded data, every ``commit_seconds``, on ``close`` and on
    leaving a ``with`` block (docs/cache.md, "Crash safety")."""

    def __init__(
        self,
        path: str | Path,
        spec: CacheSpec,
        teacher: str,
        rank: int = 0,
        commit_bytes: int = 64 << 20,
        commit_seconds: float = 600.0,
        measure_kl: bool = True,
    ):
        self.directory = Path(path)
        self.spec = spec
        self.identity = spec.teacher(teacher)
        self.prefix = f"r{rank:03d}"  # one prefix per DDP rank: ranks never touch each other's files
        self.commit_bytes = commit_bytes
        self.commit_seconds = commit_seconds
        self.measure_kl = measure_kl
        self._rows: list[tuple[bytes, int, int, int, float, float]] = []
        self._samples: list[EncodedSample] = []
        self._spans: list[np.ndarray] = []
        self._pending_bytes = 0
        self._since = time.monotonic()
        self.committed: list[Path] = []

    def append(self, sha: str, num_tokens: int, targets: SparseTargets, nll: float = float("nan")) -> None:
        self.extend([(sha, num_tokens, targets, nll)])

    def extend(self, items: Iterable[tuple]) -> None:
        """Items ``(sha, num_tokens, targets[, nll[, spans]])``; ``nll``: the teacher's summed NLL of the
        sample's actual next tokens (NaN: unknown); ``spans``: (P, 4) each position's token and place in
        the text, which a cache in the teacher's own terms needs."""
        spec = self.spec
        for sha, num_tokens, targets, *rest in items:
            nll = float(rest[0]) if rest else float("nan")
            spans = rest[1] if len(rest) > 1 else None
            if spec.teacher_terms and (spans is None or len(spans) != targets.num_positions):
                raise ValueError(
                    f"sample {sha}: a cache in the teacher's own terms stores each position's place in the "
                    f"text: got {'none' if spans is None else len(spans)} for {targets.num_positions}"
                )
            if spec.teacher_terms:
                self._spans.append(np.asarray(spans, dtype=np.int32).reshape(-1, 4))
            if not isinstance(sha, str) or len(sha) > 64 or not sha.isascii():
                raise ValueError(f"sample keys are SHA-256 hex strings, got {sha!r}")
            e = encode_targets(
                targets, spec.scheme, spec.k, spec.vocab_size, spec.value_bits, self.measure_kl
            )
            if not self._samples:
                self._since = time.monotonic()
            self._rows.append((sha.encode(), num_tokens, e.lse.shape[0], e.stream.size, e.kl, nll))
            self._samples.append(e)
            self._pending_bytes += e.stream.size + 6 * e.lse.shape[0]
        if self._pending_bytes >= self.commit_bytes or time.monotonic() - self._since >= self.commit_seconds:
            self.commit()

    def commit(self) -> Path | None:
        """Write everything appended since the last commit as one segment; None when there was nothing."""
        if not self._samples:
            return None
        cols = {
            name: np.array([r[i] for r in self._rows], dtype=_FIELDS[name][0])
            for i, name in enumerate(("sha", "num_tokens", "num_positions", "num_bytes", "kl", "nll"))
        }
        cols["lse"] = np.concatenate([e.lse for e in self._samples])
        cols["stream"] = np.concatenate([e.stream for e in self._samples])
        if self.spec.scheme != "sampled":
            cols["tail"] = np.concatenate([e.tail for e in self._samples])
        else:
            del cols["kl"]  # draws are stored exactly: nothing to measure
        if self.spec.teacher_terms:
            spans = np.concatenate(self._spans)
            cols.update({name: spans[:, i] for i, name in enumerate(SPAN_FIELDS)})
        samples = len({r[0] for r in self._rows})
        with Segment(self.directory, self.prefix, self.spec, samples) as segment:
            g = segment.group(self.identity, len(self._rows), len(cols["lse"]), len(cols["stream"]))
            segment.write(g, cols)
            path = segment.commit()
        self._rows, self._samples, self._spans, self._pending_bytes = [], [], [], 0
        self.committed.append(path)
        return path

    def close(self) -> None:
        self.commit()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if not isinstance(error, CacheSpaceError):  # a full disk stays full: no second try
            self.close()


def open_segment(path: Path) -> h5py.File:
    """A committed segment, read-only; a truncated or unreadable file is a ``CacheCorruptError``."""
    try:
        # committed segments never change, so HDF5's file locks buy nothing and break on some network FSs
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise CacheCorruptError(path, f"the file cannot be opened ({error})") from error


_SAMPLES_IN_NAME = re.compile(r"-n(\d+)\.h5$")


def named_samples(path: Path) -> int | None:
    """The number of samples a committed segment held, from its name (None: named before names had it)."""
    match = _SAMPLES_IN_NAME.search(path.name)
    return int(match.group(1)) if match else None


def replaced_names(path: Path) -> list[str]:
    """The segments that ``path`` (a compacted segment) supersedes."""
    with open_segment(path) as f:
        return json.loads(f.attrs.get("replaces", "[]"))


def scan_segments(directory: Path) -> tuple[list[Path], list[Path]]:
    """(live, superseded) committed segments. Partial files never match ``*.h5``."""
    paths = sorted(directory.glob("*.h5"))
    replaced = {name for p in paths for name in replaced_names(p)}
    return [p for p in paths if p.name not in replaced], [p for p in paths if p.name in replaced]
