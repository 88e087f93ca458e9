"""What verifying a tokenized-cache entry costs when a run opens it.

A synthetic entry of ``--tokens`` tokens in samples of ``--sample-tokens`` (random valid ids, half of
them trainable, a ``path:line`` source each) is written by ``TokenizedEntry.build``, as encoding would
write it. Then, in ``--rounds`` interleaved rounds (alternating which goes first: the machine's speed
drifts), the entry is opened two ways: ``TokenizedSamples(directory)`` (sizes checked only: what an
open cost before checksums, and what a spawned worker still does) vs ``TokenizedEntry.open()`` (sizes
and every array's xxh3-64 checksum). Medians of each; the ratio and the verification's throughput.
The files are in the page cache (they were just written): from a cold disk the checksum reads the
whole entry once at open, at the disk's speed, where the memory maps would read it during the epoch.

    python benchmarks/tokenized.py [--tokens 40000000] [--sample-tokens 400] [--rounds 5]

Last line: one JSON object with open_seconds_sizes_only, open_seconds_verified, verify_seconds,
verified_to_sizes_only_ratio, verify_gb_per_second, entry_bytes, tokens, samples.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from _common import result

from distill.data.chunks import EncodedChunk
from distill.data.encoding import EncodingStats
from distill.data.tokenized import TokenizedEntry, TokenizedSamples

VOCAB = 32_000


def synthetic_chunks(tokens: int, sample_tokens: int, per_chunk: int = 4096) -> Iterator[EncodedChunk]:
    """``tokens`` random tokens in samples of ``sample_tokens``, ``per_chunk`` samples a chunk."""
    rng = np.random.default_rng(0)
    samples = tokens // sample_tokens
    for start in range(0, samples, per_chunk):
        n = min(per_chunk, samples - start)
        ids = rng.integers(0, VOCAB, n * sample_tokens, dtype=np.int32)
        yield EncodedChunk(
            input_ids=ids,
            trainable=(np.arange(ids.size) % sample_tokens) >= sample_tokens // 2,
            lengths=np.full(n, sample_tokens, np.int64),
            shas=[f"{start + i:064x}" for i in range(n)],
            sources=[f"data/train.jsonl:{start + i + 1}" for i in range(n)],
            values=np.full(n, np.nan, np.float32),
            stats=EncodingStats(samples=n, kept=n),
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=40_000_000)
    parser.add_argument("--sample-tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        entry = TokenizedEntry(tmp, {"benchmark": args.tokens})
        start = time.perf_counter()
        entry.build(synthetic_chunks(args.tokens, args.sample_tokens), {})
        print(f"built {entry.data} in {time.perf_counter() - start:.1f} s", flush=True)
        entry_bytes = sum(path.stat().st_size for path in entry.data.iterdir())
        seconds: dict[str, list[float]] = {"sizes": [], "verified": []}
        for round_no in range(args.rounds):
            for way in ("sizes", "verified") if round_no % 2 == 0 else ("verified", "sizes"):
                start = time.perf_counter()
                samples = TokenizedSamples(entry.data) if way == "sizes" else entry.open()
                seconds[way].append(time.perf_counter() - start)
                assert samples is not None and len(samples) == args.tokens // args.sample_tokens
                del samples
            print(
                f"round {round_no}: sizes only {seconds['sizes'][-1]:.4f} s, "
                f"verified {seconds['verified'][-1]:.4f} s",
                flush=True,
            )
    sizes, verified = statistics.median(seconds["sizes"]), statistics.median(seconds["verified"])
    verify = max(verified - sizes, 1e-9)
    result(
        {
            "open_seconds_sizes_only": round(sizes, 5),
            "open_seconds_verified": round(verified, 5),
            "verify_seconds": round(verify, 5),
            "verified_to_sizes_only_ratio": round(verified / sizes, 1),
            "verify_gb_per_second": round(entry_bytes / verify / 1e9, 2),
            "entry_bytes": entry_bytes,
            "tokens": args.tokens,
            "samples": args.tokens // args.sample_tokens,
            "rounds": args.rounds,
        }
    )


if __name__ == "__main__":
    main()
