"""``python -m distill cache stats PATH``: what a teacher cache holds and what it costs on disk."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import h5py

from distill.cache import SPEC_FILE, CacheSpec, _scan, cache_stats


def describe(path: Path) -> dict:
    """``cache_stats`` plus the settings the cache was built with and each teacher's identity."""
    stats = cache_stats(path)
    spec = CacheSpec.from_json((path / SPEC_FILE).read_text()) if (path / SPEC_FILE).exists() else None
    identities: dict[str, dict] = {}
    for segment in _scan(path)[0] if path.is_dir() else [path]:  # live segments only
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
    args = parser.parse_args(argv)
    if not args.path.exists():
        parser.error(f"{args.path} does not exist")
    described = describe(args.path)
    print(json.dumps(described) if args.json else render(args.path, described))
