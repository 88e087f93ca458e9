"""Teacher collection speed and cache size.

Speed, in one run on the same batches: tokens/s of the teacher's bare forward pass (logits for every
position) vs tokens/s of the full collection (forward + top-k + log-sum-exp + encoding + writing
segment files, through ``distill.teacher.collect.collect``, the code ``fit`` uses). The two alternate
over ``--repeats`` rounds (forward first in even rounds, collection first in odd ones, so that a
change of the machine's load during the run hits both); the figure is the median of the rounds'
ratios, with their min and max. Measured twice: on the bundled trained teacher (5.6M parameters,
74% of them in its 32k-word head, which takes about two thirds of its forward's time on a CPU), and
over a few batches on a larger teacher built from a config (31M parameters, the same vocabulary, 39%
in the head, about a third of the forward's time; random weights change no cost, and only the ratio
is reported): the vocabulary-wide work of collection then weighs less, as in real teachers.

Then the cache's bytes per stored position at K=64, the KL between the distribution read back from
the cache and the exact top-k+tail one (measured by the writer on every position), and the bytes
per position in sampled mode (the fewest draws giving 12 distinct tokens per position on average).

    python benchmarks/collect.py [--samples 96] [--k 64] [--repeats 5] [--large-samples 16]

Last line: one JSON object with collect_vs_forward (median, bundled teacher),
collect_vs_forward_spread ([min, max]), collect_vs_forward_large (and its spread), repeats,
bytes_per_position, k, kl_stored_vs_exact, sampled_bytes_per_position, vocab_size (and the raw
figures: medians of the rounds; the machine's 1-minute load average at the start and the end).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import DATA, TEACHER, device_name, require_teacher, result
from transformers import AutoTokenizer

from distill.cache import cache_stats, open_cache
from distill.data.batch import TokenBatch
from distill.data.batching import Collator
from distill.data.encoding import Encoded, encode_all
from distill.data.formats import read_records
from distill.teacher.collect import cache_spec, collect, plan_jobs
from distill.teacher.module import Teacher, TeacherModule
from distill.teacher.sparse import Sparsity

# 31M parameters: the bundled teacher's vocabulary, 12 layers of width 384 (39% of the weights in the
# head, 74% in the bundled teacher)
LARGE_TEACHER = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


def forward_tokens_per_second(teacher: TeacherModule, batches: list[TokenBatch], tokens: int) -> float:
    model = teacher.teacher_model(0)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.sum().item()
    return tokens / (time.perf_counter() - start)


def collect_once(teacher: TeacherModule, samples: list, tokenizer, directory: Path, batch_size: int) -> float:
    """Seconds to collect ``samples`` into a fresh cache at ``directory`` (the teacher already loaded)."""
    spec = cache_spec(teacher, tokenizer, None, 512, value_bits=6)
    cache = open_cache(directory, spec, rebuild=True)
    jobs = plan_jobs(teacher, [(cache, samples)])
    teacher.teacher_model(0)  # collect frees it when done: loading is not collection
    start = time.perf_counter()
    collect(
        teacher, jobs, Collator(tokenizer.pad_token_id), batch_size, torch.device("cpu"), commit_seconds=1e9
    )
    return time.perf_counter() - start


def speed(
    teacher: TeacherModule,
    samples: list[Encoded],
    tokenizer,
    directory: Path,
    batch_size: int,
    repeats: int,
) -> tuple[dict[str, list[float]], int]:
    """Tokens/s of the bare forward and of the collection, and their ratio, per interleaved round;
    the teacher's number of parameters."""
    collator = Collator(tokenizer.pad_token_id)
    batches = [collator(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    tokens = sum(len(s.input_ids) for s in samples)
    forward_tokens_per_second(teacher, batches[:2], 1)  # warm-up: weights loaded, kernels chosen
    parameters = teacher.teacher_model(0).num_parameters()
    collect_once(teacher, samples[: 2 * batch_size], tokenizer, directory, batch_size)
    runs: dict[str, list[float]] = {"forward": [], "collect": []}
    for round_ in range(repeats):
        for what in ("forward", "collect") if round_ % 2 == 0 else ("collect", "forward"):
            if what == "forward":
                runs[what].append(forward_tokens_per_second(teacher, batches, tokens))
            else:
                runs[what].append(tokens / collect_once(teacher, samples, tokenizer, directory, batch_size))
    runs["ratio"] = [c / f for c, f in zip(runs["collect"], runs["forward"], strict=True)]
    teacher.release()
    return runs, parameters


def median(values: list[float], digits: int = 3) -> float:
    return round(statistics.median(values), digits)


def spread(values: list[float]) -> list[float]:
    return [round(min(values), 3), round(max(values), 3)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=96, help="text_train.jsonl documents (512 tokens max)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of forward and collection")
    parser.add_argument("--large-samples", type=int, default=16, help="documents for the larger teacher")
    parser.add_argument("--unique", type=float, default=12, help="distinct sampled tokens per position")
    args = parser.parse_args()
    require_teacher()
    load = [os.getloadavg()[0]]  # other work on the machine moves the figures: shown with them
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    records = read_records([DATA / "text_train.jsonl"])[: max(args.samples, args.large_samples)]
    encoded, _ = encode_all(records, tokenizer, None, 512, "right", train_on_responses_only=False)
    samples = encoded[: args.samples]
    teacher_cfg = [Teacher(model=str(TEACHER), name="demo-teacher", dtype="float32")]
    teacher = TeacherModule(teacher_cfg, Sparsity(k=args.k), tokenizer=str(TEACHER))
    large_cfg = [Teacher(model_config=LARGE_TEACHER, name="large-random", dtype="float32")]
    large = TeacherModule(large_cfg, Sparsity(k=args.k), tokenizer=str(TEACHER))

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "cache"
        runs, parameters = speed(teacher, samples, tokenizer, directory, args.batch_size, args.repeats)
        stats = cache_stats(directory)  # the last collection's
        large_samples = encoded[: args.large_samples]
        large_runs, large_parameters = speed(
            large, large_samples, tokenizer, Path(tmp) / "large", args.batch_size, args.repeats
        )

        # sampled mode: the fewest draws that give >= --unique distinct tokens per position on average
        for draws in (12, 16, 24, 32, 48, 64):
            sparsity = Sparsity(k=0, scheme="sampled", num_draws=draws)
            sampled = TeacherModule(teacher_cfg, sparsity, tokenizer=str(TEACHER))
            path = Path(tmp) / f"sampled-{draws}"
            collect_once(sampled, samples, tokenizer, path, args.batch_size)
            reader = open_cache(path, cache_spec(sampled, tokenizer, None, 512, 6)).reader()
            per_position = [(t.sample_counts > 0).sum(-1) for t in reader.read([s.sha for s in samples])]
            unique = float(torch.cat(per_position).float().mean())
            if unique >= args.unique:
                break
        sampled_stats = cache_stats(path)
    load.append(os.getloadavg()[0])

    print(
        f"device: {device_name()}; vocabulary {teacher.vocab_size:,}; {args.repeats} interleaved rounds; "
        f"load average (1 min) {load[0]:.2f} at the start, {load[1]:.2f} at the end"
    )
    for name, params, n, rounds in (
        (f"teacher {TEACHER.name}", parameters, len(samples), runs),
        ("larger random teacher", large_parameters, len(large_samples), large_runs),
    ):
        print(
            f"{name} ({params:,} parameters, {n} samples): bare forward {median(rounds['forward'], 0):,.0f} "
            f"tokens/s, collection {median(rounds['collect'], 0):,.0f} tokens/s (medians); collection / "
            f"forward per round: {[round(x, 3) for x in rounds['ratio']]}"
        )
    print(
        f"top-{args.k}: {stats['bytes_per_position']:.1f} bytes/position over "
        f"{stats['positions']:,} positions "
        f"(naive int32+fp16: {6 * args.k}), KL(exact || stored) {stats['kl_stored_vs_exact']:.2e} nats"
    )
    print(
        f"sampled ({draws} draws, {unique:.1f} unique tokens/position on average): "
        f"{sampled_stats['bytes_per_position']:.1f} bytes/position"
    )
    result(
        {
            "collect_vs_forward": median(runs["ratio"]),
            "collect_vs_forward_spread": spread(runs["ratio"]),
            "collect_vs_forward_large": median(large_runs["ratio"]),
            "collect_vs_forward_large_spread": spread(large_runs["ratio"]),
            "repeats": args.repeats,
            "bytes_per_position": round(stats["bytes_per_position"], 1),
            "k": args.k,
            "kl_stored_vs_exact": stats["kl_stored_vs_exact"],
            "sampled_bytes_per_position": round(sampled_stats["bytes_per_position"], 1),
            "sampled_unique_per_position": round(unique, 2),
            "sampled_draws": draws,
            "vocab_size": teacher.vocab_size,
            "forward_tokens_per_s": round(statistics.median(runs["forward"])),
            "collect_tokens_per_s": round(statistics.median(runs["collect"])),
            "large_parameters": large_parameters,
            "large_forward_tokens_per_s": round(statistics.median(large_runs["forward"])),
            "large_collect_tokens_per_s": round(statistics.median(large_runs["collect"])),
            "load_average": [round(x, 2) for x in load],
        }
    )


if __name__ == "__main__":
    main()
