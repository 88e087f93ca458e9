"""A teacher cache directory checked against a spec: open or rebuild it, plan its sync with a dataset,
hand out writers and readers."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.cache.compaction import MERGED_PREFIX, compact_segments, delete_superseded
from distill.cache.lock import LOCK_FILES, CacheLockedError, nobody_reads
from distill.cache.reader import CacheReader, named_corruption, sha_keys
from distill.cache.segment import CacheWriter, atomic_write_text, open_segment, scan_segments
from distill.cache.spec import SPEC_FILE, CacheSpec, raise_stale, spec_from_attrs
from distill.cache.stats import cache_stats

MAX_SEGMENTS = 32  # a sync merges past this many live segments: each reader opens every one
MERGED_SEGMENT_BYTES = 1 << 30  # merges write segments of about this size: the spare disk a merge needs


@dataclass
class SyncPlan:
    """What to do to make a cache hold a dataset; samples are matched by content SHA only, so moved or
    reordered samples are kept and an edited one is a new SHA (collected). Cached samples that are not
    in this dataset (a subset run, another file list, an edit) are ``absent``: kept, never dropped
    by a sync; ``TeacherCache.prune`` removes them when asked."""

    to_collect: dict[str, list[str]]  # per teacher: dataset samples it lacks, in dataset order
    keep: int  # dataset samples already complete for every teacher
    absent: list[str]  # cached samples not in this dataset

    def __str__(self) -> str:
        todo = ", ".join(f"{t}: {len(s)}" for t, s in self.to_collect.items())
        return f"keep {self.keep}, collect {{{todo}}}, {len(self.absent)} cached samples not in this data"


@dataclass
class Freed:
    """What a prune removed (or would remove): samples, and the bytes of their targets (encoded stream
    plus 6 bytes of lse and tail per position, before HDF5's compression)."""

    samples: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.samples} samples, {self.bytes:,} bytes"


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
        """Compare the dataset's SHAs with what each of the spec's teachers has stored."""
        reader = self.reader()
        index = reader.load_index()
        wanted = sha_keys(dict.fromkeys(dataset_shas))
        complete = np.ones(len(wanted), dtype=bool)
        to_collect = {}
        for t in self.spec.teachers:
            ix = index.get(t["name"])
            have = ix.find(wanted)[1] if ix is not None else np.zeros(len(wanted), dtype=bool)
            to_collect[t["name"]] = [s.decode() for s in wanted[~have]]
            complete &= have
        cached = np.unique(np.concatenate([ix.sha for ix in index.values()] or [sha_keys([])]))
        absent = [s.decode() for s in np.setdiff1d(cached, wanted)]
        reader.close()
        return SyncPlan(to_collect, int(complete.sum()), absent)

    def drop(self, shas: Iterable[str]) -> int:
        """Remove samples (all teachers) by rewriting the segments holding them; returns how many.
        Under the writer lock; readers open meanwhile keep the old segments until they close."""
        keys = sha_keys(shas)
        hit, removed = [], set()
        for p in scan_segments(self.path)[0]:
            with open_segment(p) as f:
                found = {bytes(s) for g in f["teachers"].values() for s in np.intersect1d(g["sha"][:], keys)}
            if found:
                hit.append(p)
                removed |= found
        if hit:
            compact_segments(self.path, hit, keys)
        delete_superseded(self.path)  # also what a crash after an earlier compaction's rename left
        return len(removed)

    def prune(self, keep: Sequence[str], dry_run: bool = False) -> Freed:
        """Drop every sample not in ``keep`` (the SHAs of the data to keep); ``dry_run`` only counts.
        Under the writer lock."""
        reader = self.reader()
        index = reader.load_index()
        wanted = sha_keys(dict.fromkeys(keep))
        gone = np.unique(
            np.concatenate([ix.sha[~np.isin(ix.sha, wanted)] for ix in index.values()] or [sha_keys([])])
        )
        freed = 0
        for ix in index.values():
            rows, found = ix.find(gone)
            rows = rows[found]
            freed += int(ix.nbytes[rows].sum() + 6 * ix.npos[rows].sum())  # stream + lse (f4) + tail (f2)
        reader.close()
        if not dry_run and len(gone):
            self.drop(s.decode() for s in gone)
        return Freed(len(gone), freed)

    def tidy(self, max_segments: int = MAX_SEGMENTS, merged_bytes: int = MERGED_SEGMENT_BYTES) -> int:
        """Merge the segments holding a sample twice (two runs collected it), and, past
        ``max_segments`` live segments, the writers' segments into ones of about ``merged_bytes`` (a
        merge needs about that much spare disk; a merged segment is never rewritten by this again);
        returns how many segments were merged. Under the writer lock, as every sync is."""
        live, _ = scan_segments(self.path)
        duplicated = segments_with_duplicates(live)
        if duplicated:
            compact_segments(self.path, duplicated, sha_keys([]))
            live, _ = scan_segments(self.path)
        merged = len(duplicated)
        if len(live) > max_segments:
            small = [p for p in live if not p.name.startswith(MERGED_PREFIX + "-")]
            # writers' segments (merged ones are left alone) in consecutive runs of about merged_bytes
            group_of = np.cumsum([p.stat().st_size for p in small]) // merged_bytes
            for g in np.unique(group_of):
                group = [p for p, of in zip(small, group_of, strict=True) if of == g]
                if len(group) > 1:
                    compact_segments(self.path, group, sha_keys([]))
                    merged += len(group)
        delete_superseded(self.path)
        return merged

    def clear(self) -> None:
        """Delete every segment (the spec stays): chunked KD purges a trained chunk this way."""
        for p in [*self.path.glob("*.h5"), *self.path.glob(".*.partial")]:
            p.unlink()

    def remove_partials(self) -> int:
        """Delete uncommitted segments left by crashed writers. Under the writer lock (no writer runs)."""
        partials = list(self.path.glob(".*.partial"))
        for p in partials:
            p.unlink()
        return len(partials)

    def stats(self) -> dict[str, Any]:
        return cache_stats(self.path)


def segments_with_duplicates(segments: Sequence[Path]) -> list[Path]:
    """The segments holding a sample that one of ``segments`` (itself or another) holds already."""
    per_teacher: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for n, p in enumerate(segments):
        with open_segment(p) as f:
            for name, g in f["teachers"].items():
                with named_corruption(p, name):
                    sha = g["sha"][:]
                per_teacher.setdefault(name, []).append((sha, np.full(len(sha), n)))
    hit: set[int] = set()
    for parts in per_teacher.values():
        sha, seg = (np.concatenate(c) for c in zip(*parts, strict=True))
        _, inverse, counts = np.unique(sha, return_inverse=True, return_counts=True)
        hit.update(seg[counts[inverse] > 1].tolist())
    return [segments[n] for n in sorted(hit)]


def open_cache(path: str | Path, spec: CacheSpec, rebuild: bool = False) -> TeacherCache:
    """Create the cache directory, or open it and check it against ``spec`` (StaleCacheError naming
    each differing field). ``rebuild`` deletes its segments first (under the writer lock). Under DDP
    call it on rank 0, then barrier, so that one process creates or rebuilds."""
    directory = Path(path)
    marker = directory / SPEC_FILE
    ours = [p for p in directory.iterdir() if p.name not in LOCK_FILES] if directory.is_dir() else []
    if directory.exists() and (not directory.is_dir() or (ours and not marker.exists())):
        raise ValueError(f"{directory} exists and is not a teacher cache (no {SPEC_FILE}): not touching it")
    globals_only = dataclasses.replace(spec, teachers=[])
    if rebuild and directory.exists():
        readers = nobody_reads(directory)
        if readers is None:
            raise CacheLockedError(
                f"{directory}: another run reads this cache, and rebuilding it would delete its targets "
                "under it. Rebuild once that run has finished, or use another cache directory."
            )
        try:  # segments first, marker last: a crash in between leaves a cache still stale, never mixed
            TeacherCache(directory, spec).clear()
            marker.unlink(missing_ok=True)
        finally:
            os.close(readers)
    directory.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        atomic_write_text(marker, globals_only.to_json())
    diffs = spec.differences(CacheSpec.from_json(marker.read_text()))
    for p in scan_segments(directory)[0]:
        with open_segment(p) as f:
            diffs += spec.differences(spec_from_attrs(f))
    raise_stale(diffs)
    return TeacherCache(directory, spec)
