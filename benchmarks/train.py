"""Student training speed and memory: plain cross-entropy (SFT) vs KD from the teacher cache.

Same student, seed, steps and the very same batches in the same order (the demo's ``configs/kd.yaml``;
both read them through the KD data module, SFT ignoring the targets), so only the objective differs:
KD's sparse loss over the cached top-64 targets vs cross-entropy on the labels. Each mode runs
in its own process, twice, alternating, for speed; then once more each for memory (per process: CUDA
max allocated, or on a CPU peak RSS with glibc told to return freed buffers, see ``child_env``).
Tokens/s is timed after ``--warmup`` steps; the best run of each mode is kept.

    python benchmarks/train.py [--steps 40] [--warmup 5]

Last line: one JSON object with kd_vs_sft_speed and kd_vs_sft_memory (and the raw figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from _common import build, device_name, kd_and_sft_configs, peak_memory_bytes, require_teacher, result


class Clock(L.Callback):
    """Real (non-padding) input tokens per second between the end of warm-up and the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.tokens, self.start, self.seconds = warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.tokens += int(batch["attention_mask"].sum())
            self.seconds = time.perf_counter() - self.start


def child_env() -> dict[str, str]:
    """On a CPU, peak RSS should follow live tensors: glibc otherwise keeps freed (chunk, vocab) buffers
    mapped (measured: KD's peak RSS 1.19x-1.4x SFT's with the default allocator, 1.12x with this), so
    allocations of 1 MiB and more are mmapped and returned at once. CUDA memory is measured directly."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": "0"}


def one_run(mode: str, steps: int, warmup: int, directory: Path) -> dict:
    cli = build(kd_and_sft_configs(directory, steps, same_batches=True)[mode], directory / mode)
    clock = Clock(warmup)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {"tokens_per_s": clock.tokens / clock.seconds, "peak_memory": peak_memory_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", choices=("kd", "sft"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.steps, args.warmup, args.dir)))
        return
    require_teacher()
    runs: dict[str, list[dict]] = {"sft": [], "kd": []}
    memory_runs: dict[str, list[dict]] = {"sft": [], "kd": []}
    with tempfile.TemporaryDirectory() as tmp:
        # speed with the default allocator (as users run), memory with glibc returning freed buffers
        for env, store in [(os.environ, runs)] * args.repeats + [(child_env(), memory_runs)]:
            for mode in ("sft", "kd"):  # the KD cache is collected by the first KD run, then reused
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    mode,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--dir",
                    tmp,
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                store[mode].append(json.loads(out.strip().splitlines()[-1]))
    best = {m: max(r, key=lambda x: x["tokens_per_s"]) for m, r in runs.items()}
    memory = {m: min(x["peak_memory"] for x in r) for m, r in memory_runs.items()}
    print(
        f"device: {device_name()}; {args.steps} steps ({args.warmup} warm-up), "
        "batch and model of configs/kd.yaml"
    )
    for mode in ("sft", "kd"):
        speeds = [round(x["tokens_per_s"]) for x in runs[mode]]
        print(
            f"{mode}: {best[mode]['tokens_per_s']:,.0f} tokens/s (runs {speeds}), "
            f"peak memory {memory[mode] / 2**20:,.0f} MiB"
        )
    result(
        {
            "kd_vs_sft_speed": round(best["kd"]["tokens_per_s"] / best["sft"]["tokens_per_s"], 3),
            "kd_vs_sft_memory": round(memory["kd"] / memory["sft"], 3),
            "sft_tokens_per_s": round(best["sft"]["tokens_per_s"]),
            "kd_tokens_per_s": round(best["kd"]["tokens_per_s"]),
            "sft_peak_mib": round(memory["sft"] / 2**20),
            "kd_peak_mib": round(memory["kd"] / 2**20),
        }
    )


if __name__ == "__main__":
    main()
