"""Several teachers of a top-k cache mixed into the one teacher of a new cache (``cache merge``), to save
disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from distill.cache.lock import WriterLock
from distill.cache.reader import CacheReader
from distill.cache.spec import SPEC_FILE, CacheSpec
from distill.cache.store import open_cache
from distill.losses.kd import mix_teachers
from distill.targets import SparseTargets


def merge_teachers(
    source: Path,
    target: Path,
    weights: list[float] | None = None,
    k: int | None = None,
    name: str = "mixture",
) -> int:
    """Write the weighted mixture of a top-k cache's teachers (its ``k`` most likely ids, default the
    source's K, plus the exact rest as the tail) as the one teacher of a new cache; returns the number
    of samples written."""
    spec = CacheSpec.from_json((source / SPEC_FILE).read_text())
    reader = CacheReader(source)
    names = reader.teachers()
    if spec.scheme != "topk" or len(names) < 2:
        raise ValueError(
            f"{source}: merging needs a top-k cache of several teachers (has {names}, {spec.scheme})"
        )
    weights = weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} teachers {names} but {len(weights)} weights")
    k = k or spec.k
    mixture = ",".join(f"{n}:{w:g}" for n, w in zip(names, weights, strict=True))
    shas = reader.shas()  # the samples complete for every teacher
    mixed_spec = dataclasses.replace(spec, k=k, teachers=[{"name": name, "mixture": mixture}])
    with WriterLock(target), open_cache(target, mixed_spec).writer(name) as writer:  # NLL unknown: NaN
        for start in range(0, len(shas), 256):
            chunk = shas[start : start + 256]
            per_teacher = [reader.read(chunk, n) for n in names]
            tokens = reader.num_tokens(chunk, names[0])
            for i, sha in enumerate(chunk):
                mixed = mix_teachers([t[i] for t in per_teacher], weights, spec.vocab_size)
                writer.append(sha, tokens[i], _top_k(mixed, k))
    reader.close()
    return len(shas)


def _top_k(targets: SparseTargets, k: int) -> SparseTargets:
    """The k most likely ids of a normalised distribution (lse 0), ids ascending."""
    values, slots = targets.logits.topk(k, dim=-1)
    ids = targets.ids.gather(-1, slots)
    ids, order = ids.sort(dim=-1)
    return SparseTargets(ids, values.gather(-1, order), targets.lse)
