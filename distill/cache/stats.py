"""``cache_stats``: samples, positions, bytes per position and stored-vs-exact KL of a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distill.cache.reader import CacheReader, sha_keys


def cache_stats(path: str | Path) -> dict[str, Any]:
    """Samples, positions, bytes per stored position (file bytes / every stored row's positions) and,
    for head schemes, KL(exact || stored) per position as measured by the writers on the data itself."""
    reader = CacheReader(path)
    index = reader.load_index()
    nbytes = sum(p.stat().st_size for p in reader.segments)
    scheme, k, bits = reader.formats[0] if reader.formats else ("", 0, 0)
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
        "samples": len(np.unique(np.concatenate([ix.sha for ix in index.values()] or [sha_keys([])]))),
        "positions": sum(t["positions"] for t in teachers.values()),
        "bytes": nbytes,
        "bytes_per_position": nbytes / reader.stored_positions if reader.stored_positions else None,
        "segments": len(reader.segments),
        "scheme": scheme,
        "k": k,
        "value_bits": bits,
        "teachers": teachers,
        "kl_stored_vs_exact": sum(kl * n for kl, n in kls) / sum(n for _, n in kls) if measured else None,
    }
