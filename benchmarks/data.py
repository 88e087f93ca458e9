"""Data path at real scale: encoding in one and two processes, a start from the tokenized cache, packing.

Encoding: ``--records`` synthetic conversations (the bundled ones repeated, each copy's first user turn
numbered so that every record is distinct) encoded with the bundled tokenizer and the ``mistral``
template by ``encode_chunks`` with ``num_proc`` 1 and 2, in 3 interleaved rounds (median records/s of
each; the median and spread of the per-round ratio). Cached start:
``DataModule.setup`` on a file of those records with an empty tokenized cache (it encodes and writes
the cache) vs a second, new DataModule on the same file (it maps the cache), in seconds.

Packing: sample lengths are drawn (with replacement, seeded) from the bundled chat conversations'
token lengths (bundled tokenizer, chatml), then packed into rows of ``--max-length`` tokens by the old
first-fit packer (quadratic: measured up to 32,000 samples) and by ``best_fit_decreasing`` (the packer
now used, up to 1,000,000), timed in one run. The growth exponent is the slope of log(seconds) over
log(samples) between the smallest and largest size; the fill ratio is tokens / (rows x max length).

    python benchmarks/data.py [--records 6000] [--max-length 1024] [--sizes 1000 8000 32000 1000000]

Last line: one JSON object with encode_records_per_second_1/_2, encode_two_process_speedup,
first_start_seconds, cached_start_seconds, cached_start_speedup, pack_seconds_1m, pack_growth_exponent,
pack_growth_exponent_old, fill_ratio_old, fill_ratio_new (at the largest size both packers ran) and the
per-size figures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from _common import DATA, TOKENIZER, result
from transformers import AutoTokenizer

from distill.data.batching import best_fit_decreasing
from distill.data.chunks import encode_chunks
from distill.data.datamodule import DataModule
from distill.data.encoding import encode_all
from distill.data.formats import read_records
from distill.data.templates import resolve_template


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """The packer this repository used before: each sample into the first row it fits, O(n x rows)."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        for r, u in enumerate(used):
            if u + n <= capacity:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows


def timed(packer, lengths: list[int], capacity: int) -> tuple[float, float]:
    """(seconds, fill ratio) of one packing."""
    start = time.perf_counter()
    rows = packer(lengths, capacity)
    seconds = time.perf_counter() - start
    return seconds, sum(lengths) / (len(rows) * capacity)


def synthetic_records(path: Path, count: int) -> Path:
    """``count`` distinct conversations: the bundled ones over and over, each copy numbered."""
    bundled = [json.loads(line) for line in (DATA / "chat_train.jsonl").read_text().splitlines()]
    with open(path, "w") as file:
        for i in range(count):
            record = json.loads(json.dumps(bundled[i % len(bundled)]))
            first_user = next(m for m in record["messages"] if m["role"] == "user")
            first_user["content"] = f"({i}) {first_user['content']}"
            file.write(json.dumps(record) + "\n")
    return path


def encode_rates(path: Path, tokenizer, max_length: int, rounds: int = 3) -> dict[int, list[float]]:
    """records/s of ``encode_chunks`` (what the DataModule runs) with 1 and 2 processes, ``rounds``
    interleaved pairs alternating which goes first (the machine's speed drifts between runs)."""
    records = read_records(path)
    template = resolve_template(tokenizer, "mistral")
    rates: dict[int, list[float]] = {1: [], 2: []}
    for round_no in range(rounds):
        for num_proc in (1, 2) if round_no % 2 == 0 else (2, 1):
            start = time.perf_counter()
            for _ in encode_chunks(records, tokenizer, template, max_length, num_proc=num_proc):
                pass
            rates[num_proc].append(len(records) / (time.perf_counter() - start))
            print(f"encoding, {num_proc} process(es): {rates[num_proc][-1]:,.0f} records/s", flush=True)
    return rates


def start_seconds(path: Path, cache: Path, max_length: int) -> float:
    """Seconds of a new DataModule's ``setup`` (tokenizer loaded beforehand, as the model's would be)."""
    data = DataModule(
        train_files=str(path),
        tokenizer=str(TOKENIZER),
        template="mistral",
        max_seq_length=max_length,
        tokenized_cache=str(cache),
    )
    data.tokenizer  # noqa: B018 - loaded outside the timing
    start = time.perf_counter()
    data.setup("fit")
    return time.perf_counter() - start


def growth(figures: dict[int, float]) -> float:
    (n0, t0), (n1, t1) = min(figures.items()), max(figures.items())
    return math.log(t1 / t0) / math.log(n1 / n0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=6000, help="synthetic records to encode")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000, 32000, 1_000_000])
    parser.add_argument("--old-up-to", type=int, default=32000, help="largest size for the quadratic packer")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_records(Path(tmp) / "records.jsonl", args.records)
        rates = encode_rates(path, tokenizer, args.max_length)
        ratios = [two / one for one, two in zip(rates[1], rates[2], strict=True)]
        first = start_seconds(path, Path(tmp) / "cache", args.max_length)
        cached = start_seconds(path, Path(tmp) / "cache", args.max_length)
    print(f"start: {first:.2f} s encoding into the cache, {cached:.3f} s from it", flush=True)
    records = read_records([DATA / "chat_train.jsonl"])
    samples, _ = encode_all(records, tokenizer, resolve_template(tokenizer, "chatml"), args.max_length)
    pool = [len(s.input_ids) for s in samples]
    rng = random.Random(0)
    new: dict[int, tuple[float, float]] = {}
    old: dict[int, tuple[float, float]] = {}
    for n in args.sizes:
        lengths = rng.choices(pool, k=n)
        new[n] = timed(best_fit_decreasing, lengths, args.max_length)
        if n <= args.old_up_to:
            old[n] = timed(first_fit, lengths, args.max_length)
        line = f"{n:>9,} samples: best-fit decreasing {new[n][0]:.3f} s, fill {new[n][1]:.4f}"
        if n in old:
            line += f"; first-fit {old[n][0]:.3f} s, fill {old[n][1]:.4f}"
        print(line, flush=True)
    both = max(old)
    result(
        {
            "encode_records_per_second_1": round(statistics.median(rates[1]), 1),
            "encode_records_per_second_2": round(statistics.median(rates[2]), 1),
            "encode_two_process_speedup": round(statistics.median(ratios), 3),
            "encode_two_process_speedup_spread": [round(min(ratios), 3), round(max(ratios), 3)],
            "first_start_seconds": round(first, 3),
            "cached_start_seconds": round(cached, 4),
            "cached_start_speedup": round(first / cached, 1),
            "records": args.records,
            "pack_seconds_1m": new[1_000_000][0] if 1_000_000 in new else None,
            "pack_growth_exponent": round(growth({n: t for n, (t, _) in new.items()}), 3),
            "pack_growth_exponent_old": round(growth({n: t for n, (t, _) in old.items()}), 3),
            "fill_ratio_old": round(old[both][1], 4),
            "fill_ratio_new": round(new[both][1], 4),
            "fill_compared_at": both,
            "max_length": args.max_length,
            "pack_seconds_new": {n: round(t, 4) for n, (t, _) in new.items()},
            "pack_seconds_old": {n: round(t, 4) for n, (t, _) in old.items()},
        }
    )


if __name__ == "__main__":
    main()
