"""``cache_stats``: samples, positions, bytes per position, stored-vs-exact KL, duplicate rows and the
teachers' perplexity on the cached data; ``describe``: that, the cache's settings and its teachers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from distill.cache.reader import CacheReader, sha_keys
from distill.cache.segment import scan_segments
from distill.cache.spec import SPEC_FILE, CacheSpec


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
        known = np.isfinite(ix.nll)  # samples collected before the NLL was stored have NaN
        nll = float(ix.nll[known].sum() / ix.npos[known].sum()) if ix.npos[known].sum() else None
        teachers[name] = {
            "samples": len(ix.sha),
            "positions": positions,
            "duplicate_rows": ix.duplicates,
            "kl_stored_vs_exact": None if kl is None or np.isnan(kl) else kl,
            "teacher_nll_per_position": nll,
            "teacher_ppl": None if nll is None else float(np.exp(nll)),
        }
    kls = [(t["kl_stored_vs_exact"], t["positions"]) for t in teachers.values()]
    measured = all(kl is not None for kl, _ in kls) and sum(n for _, n in kls) > 0
    stats = {
        "samples": len(np.unique(np.concatenate([ix.sha for ix in index.values()] or [sha_keys([])]))),
        "positions": sum(t["positions"] for t in teachers.values()),
        "bytes": nbytes,
        "bytes_per_position": nbytes / reader.stored_positions if reader.stored_positions else None,
        "segments": len(reader.segments),
        "duplicate_rows": sum(t["duplicate_rows"] for t in teachers.values()),
        "scheme": scheme,
        "k": k,
        "value_bits": bits,
        "teachers": teachers,
        "kl_stored_vs_exact": sum(kl * n for kl, n in kls) / sum(n for _, n in kls) if measured else None,
    }
    reader.close()
    return stats


def describe(path: Path) -> dict:
    """``cache_stats`` plus the settings the cache was built with and each teacher's identity."""
    stats = cache_stats(path)
    spec = CacheSpec.from_json((path / SPEC_FILE).read_text()) if (path / SPEC_FILE).exists() else None
    identities: dict[str, dict] = {}
    for segment in scan_segments(path)[0] if path.is_dir() else [path]:  # live segments only
        with h5py.File(segment, "r", locking=False) as f:
            for name, group in f["teachers"].items():
                identities.setdefault(name, json.loads(group.attrs["teacher"]))
    for name, values in stats["teachers"].items():
        values["identity"] = identities.get(name, {})
    if spec is not None:
        shown = ("scheme", "k", "n_draws", "vocab_size", "temperature", "max_seq_length", "value_bits")
        shown += ("teacher_terms",)  # True: in the teacher's own tokenizer, for students of any tokenizer
        stats["settings"] = {name: getattr(spec, name) for name in shown}
        stats["settings"].update(
            tokenizer_hash=spec.tokenizer_hash[:16], template=_template_id(spec.template), labels=spec.labels
        )
    return stats


def _template_id(template: str) -> str:
    if not template:
        return "none (plain text)"
    if template.startswith("sha256:"):
        return template[:19]
    return "sha256:" + hashlib.sha256(template.encode()).hexdigest()[:12]
