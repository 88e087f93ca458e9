"""The HDF5 teacher cache: per sample (keyed by its content SHA-256), the teacher's sparse distribution
at each trainable position. The only module of distill that imports h5py; ``docs/cache.md`` has the
schema, the encoding (``distill.cache_codec``), the crash-safety argument and measured sizes.

A cache is a directory of immutable segment files. A writer fills a hidden ``.NAME.partial`` file and
commits it by closing, fsyncing and renaming it to ``NAME.h5``; readers only ever see committed
segments, so a crash at any instant loses at most the uncommitted partial file. Compaction (dropping
samples, merging segments) writes a new segment whose ``replaces`` attribute names the segments it
supersedes, so the switch-over is the single atomic rename as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from distill import cache_codec as codec
from distill.targets import SparseTargets

FORMAT_VERSION = 1
SCHEMES = ("topk", "sampled", "hybrid")
SPEC_FILE = "cache.json"
ENCODING = "rice-gap-ids;cbrt-rice-values;f32-lse;f16-tail-logmass"
_LIBVER = ("v110", "v110")  # extensible-array chunk index, still readable by HDF5 >= 1.10
# name: (dtype, chunk length, shuffle). Per-sample index, per-position floats, per-sample byte stream.
_FIELDS = {
    "sha": ("S64", 1024, False),
    "num_tokens": ("i4", 4096, True),
    "num_positions": ("i4", 4096, True),
    "num_bytes": ("i8", 4096, True),
    "kl": ("f8", 4096, True),
    "lse": ("f4", 16384, True),
    "tail": ("f2", 32768, True),
    "stream": ("u1", 65536, False),  # Rice bit streams: shuffling bytes of uint8 does nothing
}


class StaleCacheError(RuntimeError):
    """The cache on disk was built with other settings than the ones asked for."""


@dataclass
class CacheSpec:
    """What a cache holds; two caches are interchangeable only if every field matches."""

    scheme: str = "topk"
    """"topk" (exact head + tail bucket), "sampled" (draws with counts) or "hybrid" (head + tail draws)"""
    k: int = 64
    """Head size for topk/hybrid; 0 for sampled"""
    n_draws: int = 0
    """Draws per position for sampled (from the whole distribution) and hybrid (from the tail)"""
    teachers: list[dict[str, str]] = field(default_factory=list)
    """One dict per teacher: ``name`` plus what identifies its weights (``path``, ``revision`` or a hash)"""
    tokenizer_hash: str = ""
    vocab_size: int = 0
    """True vocabulary size, not the padded lm_head size"""
    temperature: float = 1.0
    """Temperature the draws were taken at; stored logits are always raw (temperature 1)"""
    template: str = ""
    """Chat template source (Jinja); texts over 256 characters are replaced by their SHA-256"""
    max_seq_length: int = 0
    labels: str = ""
    """What decides the trainable positions: loss on responses only or everything, truncation side"""
    value_bits: int = 6
    """Resolution of the cube-root head-value codes; 6 bits: ~1.5e-4 nats KL on peaked distributions"""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if (self.k > 0) == (self.scheme == "sampled"):
            raise ValueError(f"scheme {self.scheme!r} needs k {'== 0' if self.k > 0 else '> 0'}")
        if (self.n_draws > 0) != (self.scheme != "topk"):
            raise ValueError(f"scheme {self.scheme!r} needs n_draws {'> 0' if self.n_draws <= 0 else '== 0'}")
        if not 2 <= self.value_bits <= 16:
            raise ValueError("value_bits must be in [2, 16]")
        names = [t["name"] for t in self.teachers]
        if len(set(names)) != len(names) or any(not n or "/" in n for n in names):
            raise ValueError(f"teacher names must be unique, non-empty and without '/': {names}")
        self.teachers = [{str(k): str(v) for k, v in t.items()} for t in self.teachers]
        if len(self.template) > 256:  # attrs are small metadata; the text itself is not needed to compare
            self.template = "sha256:" + hashlib.sha256(self.template.encode()).hexdigest()

    def teacher(self, name: str) -> dict[str, str]:
        for t in self.teachers:
            if t["name"] == name:
                return t
        raise KeyError(f"teacher {name!r} is not in the cache spec ({[t['name'] for t in self.teachers]})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CacheSpec:
        return cls(**json.loads(text))

    def differences(self, cached: CacheSpec) -> list[str]:
        """Fields in which ``cached`` (on disk) differs from this (requested) spec. Teachers are compared
        by name: one the cache lacks is work to do, one the cache has with other weights is stale."""
        diffs = [
            f"{f.name}: cache has {getattr(cached, f.name)!r}, config asks for {getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name != "teachers" and getattr(cached, f.name) != getattr(self, f.name)
        ]
        wanted = {t["name"]: t for t in self.teachers}
        for t in cached.teachers:
            if t["name"] in wanted and wanted[t["name"]] != t:
                diffs.append(f"teachers[{t['name']}]: cache has {t}, config asks for {wanted[t['name']]}")
        return diffs

    def check_compatible(self, cached: CacheSpec) -> None:
        """Raise StaleCacheError naming every differing field: a cache is never reused silently."""
        _raise_stale(self.differences(cached))


def _raise_stale(diffs: Sequence[str]) -> None:
    if diffs:
        lines = "\n  ".join(dict.fromkeys(diffs))
        raise StaleCacheError(
            f"the teacher cache was built with other settings:\n  {lines}\n"
            "To delete it and collect again: `--data.init_args.rebuild_cache true` (KD fit) or "
            "`--trainer.callbacks.init_args.rebuild true` (collect), i.e. open_cache(..., rebuild=True)."
        )


def _spec_from_attrs(f: h5py.File) -> CacheSpec:
    kw = {fl.name: f.attrs.get(fl.name, fl.default) for fl in fields(CacheSpec) if fl.name != "teachers"}
    kw = {k: v.item() if isinstance(v, np.generic) else v for k, v in kw.items()}
    return CacheSpec(**kw, teachers=json.loads(f.attrs["teachers"]))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


class _Segment:
    """A segment file being written: fixed-size chunked datasets filled front to back, then committed
    by rename. Sizes are known before writing, so no chunk is ever rewritten (appending to resizable
    lzf datasets rewrites the last partial chunk and left ~7% of dead space in the file)."""

    def __init__(self, directory: Path, prefix: str, spec: CacheSpec, replaces: Sequence[str] = ()):
        now = time.time_ns()  # names sort in commit order (the reader's storage order), are never reused
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}"
        self.final = directory / f"{prefix}-{stamp}-{uuid.uuid4().hex[:8]}.h5"
        self.partial = directory / f".{self.final.name}.partial"
        # a chunk cache far above the chunk size keeps partly filled chunks in memory until complete
        self.file = h5py.File(self.partial, "w-", libver=_LIBVER, rdcc_nbytes=16 << 20)
        for fl in fields(CacheSpec):
            if fl.name != "teachers":
                self.file.attrs[fl.name] = getattr(spec, fl.name)
        self.file.attrs["encoding"] = ENCODING
        self.file.attrs["replaces"] = json.dumps(list(replaces))
        self.file.attrs["teachers"] = "[]"
        self.head = spec.scheme != "sampled"
        self._filled: dict[str, int] = {}

    def group(self, identity: dict[str, str], rows: int, positions: int, nbytes: int) -> h5py.Group:
        g = self.file.create_group(f"teachers/{identity['name']}")
        g.attrs["teacher"] = json.dumps(identity, sort_keys=True)
        for name, (dtype, chunk, shuffle) in _FIELDS.items():
            if self.head or name not in ("kl", "tail"):
                n = {"lse": positions, "tail": positions, "stream": nbytes}.get(name, rows)
                opts = {"chunks": (min(chunk, n),), "compression": "lzf", "shuffle": shuffle} if n else {}
                g.create_dataset(name, shape=(n,), dtype=dtype, **opts)
        self.file.attrs["teachers"] = json.dumps([*json.loads(self.file.attrs["teachers"]), identity])
        return g

    def write(self, g: h5py.Group, columns: dict[str, np.ndarray]) -> None:
        for name, data in columns.items():
            start = self._filled.get(g[name].name, 0)
            if len(data):
                g[name][start : start + len(data)] = data
            self._filled[g[name].name] = start + len(data)

    def commit(self) -> Path:
        """Close, fsync, rename, fsync the directory: after this returns the segment survives a crash
        (even power loss, where the file system honours fsync); before it, readers never see it."""
        self.file.close()
        _fsync(self.partial)
        os.replace(self.partial, self.final)
        _fsync(self.final.parent)
        return self.final


class CacheWriter:
    """Collects one teacher's targets for a cache directory and commits them as segment files.

    Encoded samples are buffered in memory and written as one segment per ``commit``, which happens
    every ``commit_bytes`` of encoded data, every ``commit_seconds``, on ``close`` and on leaving a
    ``with`` block (also by an exception: every appended sample is complete on its own). A crash loses
    only the uncommitted buffer; a re-run's ``plan_sync`` lists exactly those samples as missing.
    """

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
        self._rows: list[tuple[bytes, int, int, int, float]] = []
        self._samples: list[codec.EncodedSample] = []
        self._pending_bytes = 0
        self._since = time.monotonic()
        self.committed: list[Path] = []

    def append(self, sha: str, num_tokens: int, targets: SparseTargets) -> None:
        self.extend([(sha, num_tokens, targets)])

    def extend(self, items: Iterable[tuple[str, int, SparseTargets]]) -> None:
        spec = self.spec
        for sha, num_tokens, targets in items:
            if not isinstance(sha, str) or len(sha) > 64 or not sha.isascii():
                raise ValueError(f"sample keys are SHA-256 hex strings, got {sha!r}")
            e = codec.encode_targets(
                targets, spec.scheme, spec.k, spec.vocab_size, spec.value_bits, self.measure_kl
            )
            if not self._samples:
                self._since = time.monotonic()
            self._rows.append((sha.encode(), num_tokens, e.lse.shape[0], e.stream.size, e.kl))
            self._samples.append(e)
            self._pending_bytes += e.stream.size + 6 * e.lse.shape[0]
        if self._pending_bytes >= self.commit_bytes or time.monotonic() - self._since >= self.commit_seconds:
            self.commit()

    def commit(self) -> Path | None:
        """Write everything appended since the last commit as one segment; None when there was nothing."""
        if not self._samples:
            return None
        segment = _Segment(self.directory, self.prefix, self.spec)
        cols = {
            name: np.array([r[i] for r in self._rows], dtype=_FIELDS[name][0])
            for i, name in enumerate(("sha", "num_tokens", "num_positions", "num_bytes", "kl"))
        }
        cols["lse"] = np.concatenate([e.lse for e in self._samples])
        cols["stream"] = np.concatenate([e.stream for e in self._samples])
        if segment.head:
            cols["tail"] = np.concatenate([e.tail for e in self._samples])
        else:
            del cols["kl"]  # draws are stored exactly: nothing to measure
        g = segment.group(self.identity, len(self._rows), len(cols["lse"]), len(cols["stream"]))
        segment.write(g, cols)
        path = segment.commit()
        self._rows, self._samples, self._pending_bytes = [], [], 0
        self.committed.append(path)
        return path

    def close(self) -> None:
        self.commit()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_read(path: Path) -> h5py.File:
    # committed segments never change, so HDF5's file locks buy nothing and break on some network FSs
    return h5py.File(path, "r", locking=False)


def _scan(directory: Path) -> tuple[list[Path], list[Path]]:
    """(live, superseded) committed segments. Partial files never match ``*.h5``."""
    paths = sorted(directory.glob("*.h5"))
    replaced: set[str] = set()
    for p in paths:
        with _open_read(p) as f:
            replaced.update(json.loads(f.attrs.get("replaces", "[]")))
    return [p for p in paths if p.name not in replaced], [p for p in paths if p.name in replaced]


def _keys(shas: Iterable[str]) -> np.ndarray:
    return np.array(list(shas), dtype="S64")


@dataclass
class _Index:
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
        self._segments: list[Path] = []
        self._formats: list[tuple[str, int, int]] = []  # (scheme, k, value_bits) per segment
        self._index: dict[str, _Index] | None = None
        self.stored_positions = 0  # every row in the files, duplicates included: for bytes/position
        self._files: dict[int, h5py.File] = {}
        self._pid: int | None = None

    def _file(self, seg: int) -> h5py.File:
        if self._pid != os.getpid():  # handles inherited through fork are not safe to share
            self._files, self._pid = {}, os.getpid()
        if seg not in self._files:
            self._files[seg] = _open_read(self._segments[seg])
        return self._files[seg]

    def _load(self) -> dict[str, _Index]:
        if self._index is not None:
            return self._index
        self._segments = [self.path] if self.path.is_file() else _scan(self.path)[0]
        parts: dict[str, list[tuple[np.ndarray, ...]]] = {}
        for s in range(len(self._segments)):
            f = self._file(s)
            self._formats.append((str(f.attrs["scheme"]), int(f.attrs["k"]), int(f.attrs["value_bits"])))
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
            self._index[name] = _Index(*(c[first] for c in cols), order=np.argsort(first))
        return self._index

    def teachers(self) -> list[str]:
        return sorted(self._load())

    def _names(self, teacher: str | None) -> list[str]:
        name = teacher or self.teacher
        if name is not None:
            if name not in self._load():
                raise KeyError(f"teacher {name!r} is not in the cache (has {self.teachers()})")
            return [name]
        return self.teachers()

    def shas(self, teacher: str | None = None) -> list[str]:
        """Samples stored for ``teacher``, or for every teacher when none is given, in storage order."""
        names = self._names(teacher)
        if not names:
            return []
        ix = self._load()[names[0]]
        keys = ix.sha[ix.order]
        for other in names[1:]:
            keys = keys[self._load()[other].find(keys)[1]]
        return [k.decode() for k in keys]

    def __len__(self) -> int:
        return len(self.shas())

    def __contains__(self, sha: str) -> bool:
        names = self._names(None)
        return bool(names) and all(self._load()[n].find(_keys([sha]))[1][0] for n in names)

    def get(self, sha: str, teacher: str | None = None) -> SparseTargets:
        return self._read(self._one(teacher), [sha])[0]

    def num_tokens(self, shas: Sequence[str], teacher: str | None = None) -> list[int]:
        """The stored samples' token counts."""
        ix = self._load()[self._one(teacher)]
        return ix.num_tokens[ix.find(_keys(shas))[0]].tolist()

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
        ix = self._load()[name]
        rows, found = ix.find(_keys(shas))
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
                    *self._formats[int(seg)],
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


@dataclass
class SyncPlan:
    """What to do to make a cache match a dataset; samples are matched by content SHA only, so moved or
    reordered samples are kept and an edited one is a new SHA (collected) plus an old one (dropped)."""

    to_collect: dict[str, list[str]]  # per teacher: dataset samples it lacks, in dataset order
    keep: int  # dataset samples already complete for every teacher
    drop: list[str]  # cached samples no longer in the dataset

    def __str__(self) -> str:
        todo = ", ".join(f"{t}: {len(s)}" for t, s in self.to_collect.items())
        return f"keep {self.keep}, collect {{{todo}}}, drop {len(self.drop)}"


class TeacherCache:
    """A cache directory checked against a spec (see ``open_cache``): collection, sync and reading."""

    def __init__(self, path: str | Path, spec: CacheSpec):
        self.path = Path(path)
        self.spec = spec

    def writer(self, teacher: str, rank: int = 0, **kwargs: Any) -> CacheWriter:
        return CacheWriter(self.path, self.spec, teacher, rank, **kwargs)

    def reader(self, teacher: str | None = None) -> CacheReader:
        return CacheReader(self.path, teacher)

    def plan_sync(self, dataset_shas: Sequence[str]) -> SyncPlan:
        return plan_sync(self, dataset_shas)

    def drop(self, shas: Iterable[str]) -> int:
        """Remove samples (all teachers) by rewriting the segments holding them; returns how many."""
        keys = _keys(shas)
        live, superseded = _scan(self.path)
        hit, removed = [], set()
        for p in live:
            with _open_read(p) as f:
                found = {bytes(s) for g in f["teachers"].values() for s in np.intersect1d(g["sha"][:], keys)}
            if found:
                hit.append(p)
                removed |= found
        if hit:
            _compact(self.path, hit, keys)
        for p in superseded:  # left over by a crash after an earlier compaction's rename
            p.unlink(missing_ok=True)
        return len(removed)

    def compact(self) -> None:
        """Merge all segments into one (dropping duplicate samples): fewer files to open per worker."""
        live, _ = _scan(self.path)
        if len(live) > 1:
            _compact(self.path, live, _keys([]))

    def clear(self) -> None:
        """Delete every segment (the spec stays): chunked KD purges a trained chunk this way."""
        for p in [*self.path.glob("*.h5"), *self.path.glob(".*.partial")]:
            p.unlink()

    def remove_partials(self) -> int:
        """Delete uncommitted segments left by crashed writers. Only while no writer is running."""
        partials = list(self.path.glob(".*.partial"))
        for p in partials:
            p.unlink()
        return len(partials)

    def stats(self) -> dict[str, Any]:
        return cache_stats(self.path)


def open_cache(path: str | Path, spec: CacheSpec, rebuild: bool = False) -> TeacherCache:
    """Create the cache directory, or open it and check it against ``spec`` (StaleCacheError naming
    each differing field). ``rebuild`` deletes its segments first. Under DDP call it on rank 0, then
    barrier, so that one process creates or rebuilds."""
    directory = Path(path)
    marker = directory / SPEC_FILE
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir()) and not marker.exists())):
        raise ValueError(f"{directory} exists and is not a teacher cache (no {SPEC_FILE}): not touching it")
    globals_only = dataclasses.replace(spec, teachers=[])
    if rebuild and directory.exists():
        # segments first, marker last: a crash in between leaves a cache that is still stale, never mixed
        for p in [*directory.glob("*.h5"), *directory.glob(".*.partial")]:
            p.unlink()
        marker.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        _atomic_write_text(marker, globals_only.to_json())
    diffs = spec.differences(CacheSpec.from_json(marker.read_text()))
    for p in _scan(directory)[0]:
        with _open_read(p) as f:
            diffs += spec.differences(_spec_from_attrs(f))
    _raise_stale(diffs)
    return TeacherCache(directory, spec)


def plan_sync(cache: TeacherCache, dataset_shas: Sequence[str]) -> SyncPlan:
    """Compare the dataset's SHAs with what each of the spec's teachers has stored."""
    reader = cache.reader()
    index = reader._load()
    wanted = _keys(dict.fromkeys(dataset_shas))
    complete = np.ones(len(wanted), dtype=bool)
    to_collect = {}
    for t in cache.spec.teachers:
        ix = index.get(t["name"])
        have = ix.find(wanted)[1] if ix is not None else np.zeros(len(wanted), dtype=bool)
        to_collect[t["name"]] = [s.decode() for s in wanted[~have]]
        complete &= have
    cached = np.unique(np.concatenate([ix.sha for ix in index.values()] or [_keys([])]))
    drop = [s.decode() for s in np.setdiff1d(cached, wanted)]
    reader.close()
    return SyncPlan(to_collect, int(complete.sum()), drop)


def _compact(directory: Path, segments: list[Path], drop: np.ndarray) -> Path:
    """Rewrite ``segments`` without the ``drop`` SHAs and duplicates into one new segment that names
    them in ``replaces``: its rename is the commit, deleting the old files afterwards is cleanup."""
    replaces = [p.name for p in segments]
    plan: list[tuple[Path, str, np.ndarray]] = []  # (segment, teacher, rows kept)
    identities: dict[str, dict[str, str]] = {}
    sizes: dict[str, np.ndarray] = {}  # teacher -> [rows, positions, bytes]
    seen: dict[str, np.ndarray] = {}
    for p in segments:
        with _open_read(p) as f:
            # keep files that an earlier, interrupted compaction superseded superseded, or they come back
            replaces += [n for n in json.loads(f.attrs["replaces"]) if (directory / n).exists()]
            for name, g in f["teachers"].items():
                sha = g["sha"][:]
                keep = np.zeros(len(sha), dtype=bool)
                keep[np.unique(sha, return_index=True)[1]] = True
                keep &= ~np.isin(sha, drop) & ~np.isin(sha, seen.get(name, _keys([])))
                seen[name] = np.concatenate([seen.get(name, _keys([])), sha[keep]])
                identities[name] = json.loads(g.attrs["teacher"])
                plan.append((p, name, keep))
                kept = [keep.sum(), g["num_positions"][:][keep].sum(), g["num_bytes"][:][keep].sum()]
                sizes[name] = sizes.get(name, 0) + np.array(kept, dtype=np.int64)
    with _open_read(segments[0]) as f:
        spec = dataclasses.replace(_spec_from_attrs(f), teachers=[])
    out = _Segment(directory, "c", spec, replaces)
    groups = {name: out.group(identities[name], *map(int, sizes[name])) for name in sizes}
    for p, name, keep in plan:
        with _open_read(p) as f:
            _copy_rows(f["teachers"][name], groups[name], keep, out)
    path = out.commit()
    for n in replaces:
        (directory / n).unlink(missing_ok=True)
    return path


def _copy_rows(src: h5py.Group, dst: h5py.Group, keep: np.ndarray, out: _Segment, block: int = 256) -> None:
    """Copy the kept samples' encoded bytes as they are (no re-encoding), ``block`` samples a read."""
    index = {n: src[n][:] for n in ("sha", "num_tokens", "num_positions", "num_bytes", "kl") if n in src}
    npos, nbytes = index["num_positions"].astype(np.int64), index["num_bytes"]
    pos, byte = np.cumsum(npos) - npos, np.cumsum(nbytes) - nbytes
    for r0 in range(0, len(keep), block):
        r1 = min(r0 + block, len(keep))
        k = keep[r0:r1]
        if not k.any():
            continue
        cols = {n: v[r0:r1][k] for n, v in index.items()}
        p0, p1 = pos[r0], pos[r1 - 1] + npos[r1 - 1]
        for n in ("lse", "tail"):
            if n in src:
                cols[n] = src[n][p0:p1][np.repeat(k, npos[r0:r1])]
        cols["stream"] = src["stream"][byte[r0] : byte[r1 - 1] + nbytes[r1 - 1]][np.repeat(k, nbytes[r0:r1])]
        out.write(dst, cols)


def cache_stats(path: str | Path) -> dict[str, Any]:
    """Samples, positions, bytes per stored position (file bytes / every stored row's positions) and,
    for head schemes, KL(exact || stored) per position as measured by the writers on the data itself."""
    reader = CacheReader(path)
    index = reader._load()
    nbytes = sum(p.stat().st_size for p in reader._segments)
    scheme, k, bits = reader._formats[0] if reader._formats else ("", 0, 0)
    teachers = {}
    for name, ix in index.items():
        positions = int(ix.npos.sum())
        kl = float(ix.kl.sum() / positions) if scheme != "sampled" and positions else None
        teachers[name] = {
            "samples": len(ix.sha),
            "positions": positions,
            "kl_stored_vs_exact": None if kl is None or np.isnan(kl) else kl,
        }
    kls = [(t["kl_stored_vs_exact"], t["positions"]) for t in teachers.values()]
    measured = all(kl is not None for kl, _ in kls) and sum(n for _, n in kls) > 0
    reader.close()
    return {
        "samples": len(np.unique(np.concatenate([ix.sha for ix in index.values()] or [_keys([])]))),
        "positions": sum(t["positions"] for t in teachers.values()),
        "bytes": nbytes,
        "bytes_per_position": nbytes / reader.stored_positions if reader.stored_positions else None,
        "segments": len(reader._segments),
        "scheme": scheme,
        "k": k,
        "value_bits": bits,
        "teachers": teachers,
        "kl_stored_vs_exact": sum(kl * n for kl, n in kls) / sum(n for _, n in kls) if measured else None,
    }
