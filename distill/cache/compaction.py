"""Compaction: rewrite segments without dropped or duplicate samples into one new segment whose rename
is the commit (the old files it names in ``replaces`` are then only cleanup, deferred while any reader
holds the readers lock). Callers hold the writer lock."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import h5py
import numpy as np

from distill.cache.lock import nobody_reads
from distill.cache.reader import named_corruption, sha_keys
from distill.cache.segment import SPAN_FIELDS, Segment, open_segment, scan_segments
from distill.cache.spec import spec_from_attrs

MERGED_PREFIX = "c"  # names of segments a compaction wrote (writers use r<rank>)


def compact_segments(directory: Path, segments: list[Path], drop: np.ndarray) -> Path:
    """Rewrite ``segments`` without the ``drop`` SHAs and duplicates into one new segment."""
    replaces = [p.name for p in segments]
    plan: list[tuple[Path, str, np.ndarray]] = []  # (segment, teacher, rows kept)
    identities: dict[str, dict[str, str]] = {}
    sizes: dict[str, np.ndarray] = {}  # teacher -> [rows, positions, bytes]
    seen: dict[str, np.ndarray] = {}
    for p in segments:
        with open_segment(p) as f:
            # keep files that an earlier, interrupted compaction superseded, or they come back
            replaces += [n for n in json.loads(f.attrs["replaces"]) if (directory / n).exists()]
            for name, g in f["teachers"].items():
                with named_corruption(p, name):
                    sha, npos, nbytes = g["sha"][:], g["num_positions"][:], g["num_bytes"][:]
                keep = np.zeros(len(sha), dtype=bool)
                keep[np.unique(sha, return_index=True)[1]] = True
                keep &= ~np.isin(sha, drop) & ~np.isin(sha, seen.get(name, sha_keys([])))
                seen[name] = np.concatenate([seen.get(name, sha_keys([])), sha[keep]])
                identities[name] = json.loads(g.attrs["teacher"])
                plan.append((p, name, keep))
                kept = [keep.sum(), npos[keep].sum(), nbytes[keep].sum()]
                sizes[name] = sizes.get(name, 0) + np.array(kept, dtype=np.int64)
    with open_segment(segments[0]) as f:
        spec = dataclasses.replace(spec_from_attrs(f), teachers=[])
    samples = len(np.unique(np.concatenate([*seen.values(), sha_keys([])])))
    with Segment(directory, MERGED_PREFIX, spec, samples, replaces) as out:
        groups = {name: out.group(identities[name], *map(int, sizes[name])) for name in sizes}
        for p, name, keep in plan:
            with open_segment(p) as f, named_corruption(p, name):
                _copy_rows(f["teachers"][name], groups[name], keep, out)
        path = out.commit()
    delete_superseded(directory)
    return path


def delete_superseded(directory: Path) -> None:
    """Delete segments that a committed compaction replaced, unless a reader may still open them
    (every new reader ignores them either way)."""
    fd = nobody_reads(directory)
    if fd is None:
        return
    try:
        for p in scan_segments(directory)[1]:
            p.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _copy_rows(src: h5py.Group, dst: h5py.Group, keep: np.ndarray, out: Segment, block: int = 256) -> None:
    """Copy the kept samples' encoded bytes as they are (no re-encoding), ``block`` samples a read."""
    index = {
        n: src[n][:] for n in ("sha", "num_tokens", "num_positions", "num_bytes", "kl", "nll") if n in src
    }
    if "nll" not in index:  # a segment written before the field: unknown
        index["nll"] = np.full(len(index["sha"]), np.nan)
    npos, nbytes = index["num_positions"].astype(np.int64), index["num_bytes"]
    pos, byte = np.cumsum(npos) - npos, np.cumsum(nbytes) - nbytes
    for r0 in range(0, len(keep), block):
        r1 = min(r0 + block, len(keep))
        k = keep[r0:r1]
        if not k.any():
            continue
        cols = {n: v[r0:r1][k] for n, v in index.items()}
        p0, p1 = pos[r0], pos[r1 - 1] + npos[r1 - 1]
        for n in ("lse", "tail", *SPAN_FIELDS):
            if n in src:
                cols[n] = src[n][p0:p1][np.repeat(k, npos[r0:r1])]
        cols["stream"] = src["stream"][byte[r0] : byte[r1 - 1] + nbytes[r1 - 1]][np.repeat(k, nbytes[r0:r1])]
        out.write(dst, cols)
