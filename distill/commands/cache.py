"""``python -m distill cache stats PATH``: what a teacher cache holds, what it costs on disk and what the
teachers are worth on its data (perplexity); ``cache merge PATH OUT``: several teachers mixed into one,
to save disk; ``cache prune PATH --keep-data FILE...``: drop the samples of other data, explicitly;
``cache verify PATH [--repair]``: check every checksum and value, delete bad segments to recollect."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill.cache.lock import WriterLock
from distill.cache.mixture import merge_teachers
from distill.cache.spec import SPEC_FILE, CacheSpec
from distill.cache.stats import describe
from distill.cache.store import TeacherCache
from distill.cache.verify import repair_cache, verify_cache
from distill.data.formats import read_records


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
        f"  duplicate rows     {stats['duplicate_rows']:,}",
    ]
    for key, value in stats.get("settings", {}).items():
        lines.append(f"  {key:<18} {value}")
    for name, t in stats["teachers"].items():
        who = " ".join(f"{k}={v}" for k, v in t["identity"].items() if k != "name")
        ppl = f"perplexity {t['teacher_ppl']:.2f}" if t["teacher_ppl"] is not None else "perplexity n/a"
        lines.append(
            f"  teacher {name}: {t['samples']:,} samples, {t['positions']:,} positions, {ppl} {who}".rstrip()
        )
    return "\n".join(lines)


def not_a_cache(path: Path) -> str:
    """Why ``path`` is refused, and the caches under it (a user may give ``cache/kd`` for its ``train``)."""
    if not path.is_dir():
        return f"{path} is a file, not a teacher cache directory (a directory holding {SPEC_FILE})"
    inside = sorted(str(p.parent) for pattern in ("*", "*/*") for p in path.glob(f"{pattern}/{SPEC_FILE}"))
    hint = ": give a cache directory, e.g. cache/kd/train"
    hint = f"; the caches in it: {', '.join(inside)}" if inside else hint
    return f"{path} is not a teacher cache (it holds no {SPEC_FILE}){hint}"


def prune_command(
    path: Path, keep_data: list[Path], format: str, dry_run: bool, lock_timeout: float | None
) -> None:
    keep = []
    for source in keep_data:
        shas = [r.sha for r in read_records([source], format)]
        if not shas:  # an empty or wrong file would otherwise mean "keep nothing": every sample freed
            raise SystemExit(
                f"error: --keep-data {source} holds no records, so pruning to it would free every sample "
                f"of {path}; nothing was pruned. Give the data whose samples to keep; to empty the cache, "
                f"delete it (`rm -r {path}`, with no run using it): the next fit or collect recollects "
                "what its data needs"
            )
        keep += shas
    with WriterLock(path, lock_timeout):
        spec = CacheSpec.from_json((path / SPEC_FILE).read_text())
        freed = TeacherCache(path, spec).prune(keep, dry_run=dry_run)
    verb = "would free" if dry_run else "freed"
    print(f"{verb} {freed} from {path} (kept: the samples of the {len(set(keep))} records given)")


def verify_command(path: Path, repair: bool, lock_timeout: float | None) -> None:
    checked, bad = verify_cache(path)
    for b in bad:
        held = "number of samples unknown" if b.samples is None else f"{b.samples} samples"
        print(f"bad segment {b.path}: {b.problem} ({held})")
    if not bad:
        print(f"{path}: {checked} segment(s), every checksum and value checked: ok")
        return
    if not repair:
        print(f"{len(bad)} of {checked} segment(s) bad: `python -m distill cache verify {path} --repair`")
        raise SystemExit(1)
    repair_cache(path, bad, lock_timeout)
    lost = f"{sum(b.samples or 0 for b in bad)} samples"
    unknown = sum(b.samples is None for b in bad)
    if unknown:
        lost += f" and those of {unknown} segment(s) of an unknown count"
    print(f"removed {len(bad)} segment(s) ({lost}): the next fit or collect recollects them")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill cache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="samples, positions, bytes per position, K, scheme, teachers, KL")
    stats.add_argument("path", type=Path, help="a cache directory (e.g. cache/train) or one segment file")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    merge = sub.add_parser("merge", help="mix several teachers into one teacher of a new cache (less disk)")
    merge.add_argument("path", type=Path, help="a top-k cache directory with several teachers")
    merge.add_argument("output", type=Path, help="the new cache directory")
    merge.add_argument("--weights", type=float, nargs="+", help="per teacher, in name order (default: equal)")
    merge.add_argument("--k", type=int, help="ids kept per position (default: the source's K)")
    prune = sub.add_parser("prune", help="drop the cached samples that are not in the given data files")
    prune.add_argument("path", type=Path, help="a cache directory")
    prune.add_argument("--keep-data", type=Path, nargs="+", required=True, help="data files/dirs to keep")
    prune.add_argument("--format", default="auto", help="record format of the files (default: auto)")
    prune.add_argument("--dry-run", action="store_true", help="only report what would be freed")
    verify = sub.add_parser("verify", help="check every checksum and value; --repair deletes bad segments")
    verify.add_argument("path", type=Path, help="a cache directory")
    verify.add_argument("--repair", action="store_true", help="delete bad segments: they are recollected")
    for command in (prune, verify):
        command.add_argument("--lock-timeout", type=float, help="seconds to wait for another writer")
    args = parser.parse_args(argv)
    if not args.path.exists():
        parser.error(f"{args.path} does not exist")
    if (args.path.is_dir() or args.command != "stats") and not (args.path / SPEC_FILE).is_file():
        parser.error(not_a_cache(args.path))
    if args.command == "prune":
        return prune_command(args.path, args.keep_data, args.format, args.dry_run, args.lock_timeout)
    if args.command == "verify":
        return verify_command(args.path, args.repair, args.lock_timeout)
    if args.command == "merge":
        count = merge_teachers(args.path, args.output, args.weights, args.k)
        return print(f"merged {count} samples into {args.output}")
    described = describe(args.path)
    print(json.dumps(described) if args.json else render(args.path, described))
