"""A teacher cache directory checked against a spec: open or rebuild it, plan its sync with a dataset,
hand out writers and readers."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.cache.compaction import compact_segments
from distill.cache.reader import CacheReader, sha_keys
from distill.cache.segment import CacheWriter, atomic_write_text, open_segment, scan_segments
from distill.cache.spec import SPEC_FILE, CacheSpec, raise_stale, spec_from_attrs
from distill.cache.stats import cache_stats


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
        keys = sha_keys(shas)
        live, superseded = scan_segments(self.path)
        hit, removed = [], set()
        for p in live:
            with open_segment(p) as f:
                found = {bytes(s) for g in f["teachers"].values() for s in np.intersect1d(g["sha"][:], keys)}
            if found:
                hit.append(p)
                removed |= found
        if hit:
            compact_segments(self.path, hit, keys)
        for p in superseded:  # left over by a crash after an earlier compaction's rename
            p.unlink(missing_ok=True)
        return len(removed)

    def compact(self) -> None:
        """Merge all segments into one (dropping duplicate samples): fewer files to open per worker."""
        live, _ = scan_segments(self.path)
        if len(live) > 1:
            compact_segments(self.path, live, sha_keys([]))

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
        atomic_write_text(marker, globals_only.to_json())
    diffs = spec.differences(CacheSpec.from_json(marker.read_text()))
    for p in scan_segments(directory)[0]:
        with open_segment(p) as f:
            diffs += spec.differences(spec_from_attrs(f))
    raise_stale(diffs)
    return TeacherCache(directory, spec)


def plan_sync(cache: TeacherCache, dataset_shas: Sequence[str]) -> SyncPlan:
    """Compare the dataset's SHAs with what each of the spec's teachers has stored."""
    reader = cache.reader()
    index = reader.load_index()
    wanted = sha_keys(dict.fromkeys(dataset_shas))
    complete = np.ones(len(wanted), dtype=bool)
    to_collect = {}
    for t in cache.spec.teachers:
        ix = index.get(t["name"])
        have = ix.find(wanted)[1] if ix is not None else np.zeros(len(wanted), dtype=bool)
        to_collect[t["name"]] = [s.decode() for s in wanted[~have]]
        complete &= have
    cached = np.unique(np.concatenate([ix.sha for ix in index.values()] or [sha_keys([])]))
    drop = [s.decode() for s in np.setdiff1d(cached, wanted)]
    reader.close()
    return SyncPlan(to_collect, int(complete.sum()), drop)
