"""``python -m distill cache stats PATH``: what a teacher cache holds and what it costs on disk;
``python -m distill cache merge PATH OUT``: several teachers mixed into one, to save disk."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import h5py

from distill.cache.reader import CacheReader
from distill.cache.segment import scan_segments
from distill.cache.spec import SPEC_FILE, CacheSpec
from distill.cache.stats import cache_stats
from distill.cache.store import open_cache
from distill.losses.kd import mix_teachers
from distill.targets import SparseTargets


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
        stats["settings"] = {
            "scheme": spec.scheme,
            "k": spec.k,
            "n_draws": spec.n_draws,
            "vocab_size": spec.vocab_size,
            "temperature": spec.temperature,
            "max_seq_length": spec.max_seq_length,
            "value_bits": spec.value_bits,
            "tokenizer_hash": spec.tokenizer_hash[:16],
            "template": _template_id(spec.template),
            "labels": spec.labels,
        }
    return stats


def merge_teachers(
    source: Path,
    target: Path,
    weights: list[float] | None = None,
    k: int | None = None,
    name: str = "mixture",
) -> int:
    """Write the weighted mixture of a top-k cache's teachers as the one teacher of a new cache.

    The mixture over the union of the teachers' heads (``losses.mix_teachers``) keeps its ``k`` most
    likely ids (default: the source's K) plus the exact rest as the tail, so it takes one teacher's
    disk instead of several; the weights are then fixed. Returns the number of samples written."""
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
    cache = open_cache(target, dataclasses.replace(spec, k=k, teachers=[{"name": name, "mixture": mixture}]))
    shas = reader.shas()  # the samples complete for every teacher
    with cache.writer(name) as writer:
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


def _template_id(template: str) -> str:
    if not template:
        return "none (plain text)"
    if template.startswith("sha256:"):
        return template[:19]
    return "sha256:" + hashlib.sha256(template.encode()).hexdigest()[:12]


def render(path: Path, stats: dict) -> str:
    kl = stats["kl_stored_vs_exact"]
    bpp = stats["bytes_per_position"]
    lines = [
        f"cache {path}",
        f"  samples            {stats['samples']:,}",
        f"  positions          {stats['positions']:,}",
        f"  bytes              {stats['bytes']:,} in {stats['segments']} segment(s)",
        f"  bytes/position     {bpp:.1f}" if bpp is not None else "  bytes/position     -",
        f"  scheme, K          {stats['scheme']}, {stats['k']}",
        f"  KL stored||exact   {kl:.2e} nats/position" if kl is not None else "  KL stored||exact   n/a",
    ]
    for key, value in stats.get("settings", {}).items():
        lines.append(f"  {key:<18} {value}")
    for name, t in stats["teachers"].items():
        who = " ".join(f"{k}={v}" for k, v in t["identity"].items() if k != "name")
        lines.append(
            f"  teacher {name}: {t['samples']:,} samples, {t['positions']:,} positions {who}".rstrip()
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill cache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="samples, positions, bytes per position, K, scheme, teachers, KL")
    stats.add_argument("path", type=Path, help="a cache directory (e.g. cache/train) or one segment file")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    merge = sub.add_parser("merge", help="mix several teachers into one teacher of a new cache (less disk)")
    merge.add_argument("path", type=Path, help="a top-k cache directory with several teachers")
    merge.add_argument("output", type=Path, help="the new cache directory")
    merge.add_argument(
        "--weights", type=float, nargs="+", help="one per teacher, in name order (default: equal)"
    )
    merge.add_argument("--k", type=int, help="ids kept per position (default: the source's K)")
    args = parser.parse_args(argv)
    if not args.path.exists():
        parser.error(f"{args.path} does not exist")
    if args.command == "merge":
        count = merge_teachers(args.path, args.output, args.weights, args.k)
        print(f"merged {count} samples into {args.output}")
        return
    described = describe(args.path)
    print(json.dumps(described) if args.json else render(args.path, described))
