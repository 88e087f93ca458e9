"""Teacher collection speed and cache size, on the bundled trained teacher.

In one run, on the same batches: tokens/s of the teacher's bare forward pass (logits for every
position) vs tokens/s of the full collection (forward + top-k + log-sum-exp + encoding + writing
segment files, through ``distill.teacher.collect.collect``, the code ``fit`` uses), both measured twice,
interleaved, best of each. Then the cache's bytes per stored position at K=64, the KL between the
distribution read back from the cache and the exact top-k+tail one (measured by the writer on every
position), and the bytes per position in sampled mode (the fewest draws giving 12 distinct tokens
per position on average).

    python benchmarks/collect.py [--samples 96] [--k 64]

Last line: one JSON object with collect_vs_forward, bytes_per_position, k, kl_stored_vs_exact,
sampled_bytes_per_position, vocab_size (and the raw figures).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import DATA, TEACHER, device_name, require_teacher, result
from transformers import AutoTokenizer

from distill.cache import cache_stats, open_cache
from distill.data.batching import Collator
from distill.data.encoding import encode_all
from distill.data.formats import read_records
from distill.teacher.collect import cache_spec, collect, plan_jobs
from distill.teacher.module import Teacher, TeacherModule


def forward_tokens_per_second(teacher: TeacherModule, batches: list[dict], tokens: int) -> float:
    model = teacher.teacher_model(0)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum().item()
    return tokens / (time.perf_counter() - start)


def collect_once(teacher: TeacherModule, samples: list, tokenizer, directory: Path, batch_size: int) -> float:
    """Seconds to collect ``samples`` into a fresh cache at ``directory``."""
    spec = cache_spec(teacher, tokenizer, None, 512, value_bits=6)
    cache = open_cache(directory, spec, rebuild=True)
    jobs = plan_jobs(teacher, [(cache, samples)])
    start = time.perf_counter()
    collect(
        teacher, jobs, Collator(tokenizer.pad_token_id), batch_size, torch.device("cpu"), commit_seconds=1e9
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=96, help="text_train.jsonl documents (512 tokens max)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unique", type=float, default=12, help="distinct sampled tokens per position")
    args = parser.parse_args()
    require_teacher()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    records = read_records([DATA / "text_train.jsonl"])[: args.samples]
    samples, _ = encode_all(records, tokenizer, None, 512, "right", train_on_responses_only=False)
    collator = Collator(tokenizer.pad_token_id)
    batches = [collator(samples[i : i + args.batch_size]) for i in range(0, len(samples), args.batch_size)]
    tokens = sum(len(s.input_ids) for s in samples)
    teacher_cfg = [Teacher(model=str(TEACHER), name="demo-teacher", dtype="float32")]
    teacher = TeacherModule(teacher_cfg, k=args.k, tokenizer=str(TEACHER))

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "cache"
        forward_tokens_per_second(teacher, batches[:2], 1)  # warm-up: weights loaded, kernels chosen
        forward, collected = [], []
        for _ in range(2):
            forward.append(forward_tokens_per_second(teacher, batches, tokens))
            collected.append(tokens / collect_once(teacher, samples, tokenizer, directory, args.batch_size))
        stats = cache_stats(directory)

        # sampled mode: the fewest draws that give >= --unique distinct tokens per position on average
        for draws in (12, 16, 24, 32, 48, 64):
            sampled = TeacherModule(
                teacher_cfg, k=0, scheme="sampled", num_draws=draws, tokenizer=str(TEACHER)
            )
            path = Path(tmp) / f"sampled-{draws}"
            collect_once(sampled, samples, tokenizer, path, args.batch_size)
            reader = open_cache(path, cache_spec(sampled, tokenizer, None, 512, 6)).reader()
            per_position = [(t.sample_counts > 0).sum(-1) for t in reader.read([s.sha for s in samples])]
            unique = float(torch.cat(per_position).float().mean())
            if unique >= args.unique:
                break
        sampled_stats = cache_stats(path)

    print(
        f"device: {device_name()}; teacher {TEACHER.name}: {teacher.teacher_model(0).num_parameters():,} "
        f"parameters, vocabulary {teacher.vocab_size:,}; {len(samples)} samples, {tokens:,} tokens"
    )
    print(
        f"bare forward: {max(forward):,.0f} tokens/s; collection: {max(collected):,.0f} tokens/s "
        f"(runs: {[round(x) for x in forward]} vs {[round(x) for x in collected]})"
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
            "collect_vs_forward": round(max(collected) / max(forward), 3),
            "bytes_per_position": round(stats["bytes_per_position"], 1),
            "k": args.k,
            "kl_stored_vs_exact": stats["kl_stored_vs_exact"],
            "sampled_bytes_per_position": round(sampled_stats["bytes_per_position"], 1),
            "sampled_unique_per_position": round(unique, 2),
            "sampled_draws": draws,
            "vocab_size": teacher.vocab_size,
            "forward_tokens_per_s": round(max(forward)),
            "collect_tokens_per_s": round(max(collected)),
        }
    )


if __name__ == "__main__":
    main()
