"""Preference stages: DPO's speed and memory vs SFT on the same pairs, and the demos' held-out accuracy.

Speed: the policy of ``configs/dpo.yaml`` (the bundled chat model, float32, 8 pairs a batch, chunk 128)
on the very same PreferenceDataModule batches, four ways: ``sft`` (cross-entropy on both responses'
tokens, the tokens DPO reads), ``dpo_precomputed`` (the reference's log-probs read from a store filled
by an untimed process beforehand: a step has no reference forward), and with a LoRA adapter
(``configs/examples/dpo_lora.yaml``) ``sft_lora`` and ``dpo_adapter`` (the reference is the policy with
its adapter disabled: one more forward without gradients). Each mode runs in its own process,
interleaved, ``--repeats`` rounds; the median is kept. Then once more each for memory (CUDA max
allocated, or peak RSS with glibc returning freed buffers, see ``train.child_env``). On a CPU each
process runs ``--threads`` threads (default 1): on shared cores a second OpenMP thread waits on a
descheduled one (measured with a neighbour busy: SFT 213 tokens/s on 2 threads, 1,531 on 1).

Quality: ``configs/rm.yaml`` as is (held-out ``val/accuracy``), and ``configs/dpo.yaml`` with the
precomputed reference, validated before training and after it. Before training the policy is the
reference, so every implicit reward is 0 and ``rewards/accuracies`` (strictly chosen > rejected) is 0 by
definition; the share of held-out pairs whose chosen response has the higher log-prob under the policy
(``logp_heldout_accuracy``) says where the policy starts.

    python benchmarks/preference.py [--steps 30] [--warmup 5] [--repeats 3]

Last line: one JSON object with dpo_precomputed_vs_sft_speed, dpo_adapter_ref_vs_sft_speed,
dpo_precomputed_vs_sft_memory, rm_heldout_accuracy, dpo_heldout_accuracy_before/after (and the raw
figures).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import ROOT, build, demo_config, device_name, peak_memory_bytes, require_teacher, result
from train import Clock, child_env

from distill.objectives.reference import sequence_logps

SPEED_MODES = ("sft", "dpo_precomputed", "sft_lora", "dpo_adapter")
QUALITY = ("rm", "dpo_before", "dpo")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def dpo_precomputed(directory: Path) -> dict:
    config = demo_config("dpo.yaml", directory)
    config["model"]["init_args"]["objective"]["init_args"].update(
        reference="precomputed", reference_cache=str(directory / "reference")
    )
    return config


def speed_config(mode: str, steps: int, directory: Path) -> dict:
    """The DPO demo's run for ``steps`` steps, bare: no validation, logger, checkpoint or callback."""
    config = dpo_precomputed(directory)
    config["trainer"].update(
        max_steps=steps, logger=False, callbacks=[], num_sanity_val_steps=0, limit_val_batches=0
    )
    model = config["model"]["init_args"]
    if mode.startswith("sft"):
        model["objective"] = {
            "class_path": "distill.objectives.CrossEntropy",
            "init_args": {"chunk_size": 128},
        }
    if mode.endswith("lora") or mode == "dpo_adapter":
        model.update(load("examples/dpo_lora.yaml")["model"]["init_args"])  # the adapter and its lr
    if mode == "dpo_adapter":
        model["objective"]["init_args"]["reference"] = "adapter"
    return config


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory``: its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


def one_run(mode: str, steps: int, warmup: int, directory: Path) -> dict:
    cli = build(speed_config(mode, steps, directory), directory / mode)
    store = snapshot(directory / "reference")
    assert store or mode != "dpo_precomputed", "the reference store was not filled before the timed run"
    clock = Clock(warmup)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # a store found is only read; one not found would be computed, with the reference model, and written
    assert snapshot(directory / "reference") == store, f"{mode} wrote the reference store: it ran the model"
    return {"tokens_per_s": clock.tokens / clock.seconds, "peak_memory": peak_memory_bytes()}


def fill_store(directory: Path) -> dict:
    """One untimed step of ``dpo_precomputed``: tokenizes the data and computes the reference store."""
    cli = build(speed_config("dpo_precomputed", 1, directory), directory / "fill")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {"stores": len(list((directory / "reference").glob("*/meta.json")))}


@torch.no_grad()
def logp_accuracy(cli) -> float:
    """Share of held-out pairs whose chosen response has the higher summed log-prob under the policy."""
    model = cli.model.causal_lm
    mode, wins, pairs = model.training, 0, 0
    model.eval()
    for batch in cli.datamodule.val_dataloader():
        batch = {k: v.to(cli.model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logps = sequence_logps(model, batch)
        wins += int((logps[0::2] > logps[1::2]).sum())
        pairs += logps.shape[0] // 2
    model.train(mode)
    return wins / pairs


def last_logged(directory: Path, key: str) -> float:
    (path,) = directory.glob("lightning_logs/*/metrics.csv")
    values = [row[key] for row in csv.DictReader(path.open()) if row.get(key)]
    return float(values[-1])


def quality(which: str, directory: Path) -> dict:
    if which == "rm":
        cli = build(demo_config("rm.yaml", directory), directory)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return {"rm_heldout_accuracy": last_logged(directory, "val/accuracy")}
    cli = build(dpo_precomputed(directory), directory)
    if which == "dpo_before":  # the untrained policy, validated in a process of its own
        (before,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule)
        return {
            "dpo_heldout_accuracy_before": before["val/rewards/accuracies"],
            "logp_heldout_accuracy_before": logp_accuracy(cli),
        }
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {
        "dpo_heldout_accuracy_after": last_logged(directory, "val/rewards/accuracies"),
        "logp_heldout_accuracy_after": logp_accuracy(cli),
    }


def child(env: dict, *args: str) -> dict:
    cmd = [sys.executable, __file__, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (0: torch's)")
    parser.add_argument("--one", choices=SPEED_MODES, help=argparse.SUPPRESS)  # child processes
    parser.add_argument("--fill", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quality", choices=QUALITY, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_run(args.one, args.steps, args.warmup, args.dir)))
        return
    if args.fill:
        print(json.dumps(fill_store(args.dir)))
        return
    if args.quality:
        print(json.dumps(quality(args.quality, args.dir)))
        return
    require_teacher()
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {m: [] for m in SPEED_MODES}
    memory: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DISTILL_DATA_CACHE"] = str(Path(tmp) / "tokenized")  # tokenized once, shared
        common = ["--threads", str(args.threads), "--dir", tmp]
        timing = ["--steps", str(args.steps), "--warmup", str(args.warmup), *common]
        child(dict(os.environ), "--fill", *common)
        for _ in range(args.repeats):
            for mode in SPEED_MODES:
                runs[mode].append(child(dict(os.environ), "--one", mode, *timing))
        for mode in SPEED_MODES:
            memory[mode] = child(child_env(), "--one", mode, *timing)["peak_memory"]
        scores = {}
        for which in QUALITY:
            where = ["--threads", str(args.threads), "--dir", str(Path(tmp) / which)]
            scores.update(child(dict(os.environ), "--quality", which, *where))
    speed = {m: statistics.median(x["tokens_per_s"] for x in r) for m, r in runs.items()}
    print(
        f"device: {device_name()}; {args.steps} steps ({args.warmup} warm-up), {args.repeats} rounds, "
        f"policy and batches of configs/dpo.yaml; {time.perf_counter() - start:.0f} s in all"
    )
    for mode in SPEED_MODES:
        speeds = [round(x["tokens_per_s"]) for x in runs[mode]]
        spread = (max(speeds) - min(speeds)) / speed[mode]
        print(
            f"{mode:>16}: {speed[mode]:,.0f} tokens/s median (runs {speeds}, spread {spread:.0%}), "
            f"peak memory {memory[mode] / 2**20:,.0f} MiB"
        )
    for key, value in scores.items():
        print(f"{key}: {value:.3f}")
    result(
        {
            "dpo_precomputed_vs_sft_speed": round(speed["dpo_precomputed"] / speed["sft"], 3),
            "dpo_adapter_ref_vs_sft_speed": round(speed["dpo_adapter"] / speed["sft_lora"], 3),
            "dpo_precomputed_vs_sft_memory": round(memory["dpo_precomputed"] / memory["sft"], 3),
            **{f"{m}_tokens_per_s": round(speed[m]) for m in SPEED_MODES},
            **{f"{m}_peak_mib": round(memory[m] / 2**20) for m in SPEED_MODES},
            **{k: round(v, 3) for k, v in scores.items()},
        }
    )


if __name__ == "__main__":
    main()
