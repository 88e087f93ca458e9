"""GPU speed and memory of the demo KD run (``configs/kd.yaml``) under each single-GPU set-up.

Runs the demo config as it is (200 steps, batch 16, the bundled teacher's cache collected by the first
run and reused by the others) in one process per variant: fp32, bf16-mixed, and bf16-mixed under
DeepSpeed ZeRO-2 and ZeRO-3 (``configs/strategy/``). Tokens/s is the median of Lightning's
ThroughputMonitor's values (each a mean over the last 50 steps; padded tokens, as the logs show them);
memory is the CUDA peak from ``distill.callbacks.PeakMemory``. A variant that fails is reported with its
error.

    python benchmarks/strategies.py [--steps 200] [--variants fp32 bf16 deepspeed_stage2 deepspeed_stage3]

Last line: one JSON object: each variant's figures, and ratios against bf16 on one GPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _common import ROOT, device_name, require_teacher, result

VARIANTS = {  # name: (precision, strategy config)
    "fp32": ("32-true", None),
    "bf16": ("bf16-mixed", None),
    "deepspeed_stage2": ("bf16-mixed", "deepspeed_stage2"),
    "deepspeed_stage3": ("bf16-mixed", "deepspeed_stage3"),
}


def run(name: str, directory: Path, cache: Path, steps: int) -> dict:
    precision, strategy = VARIANTS[name]
    config = yaml.safe_load((ROOT / "configs" / "kd.yaml").read_text())
    config["precision"] = precision
    config["trainer"].update(
        max_steps=steps,
        val_check_interval=steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(directory),
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(directory)},
        },
        callbacks=["distill.callbacks.PeakMemory", "distill.callbacks.TokenThroughput"],
    )
    config["data"]["init_args"]["cache_dir"] = str(cache)
    directory.mkdir(parents=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = [sys.executable, "-m", "distill", "fit", "--config", str(path)]
    if strategy:
        args += ["--config", str(ROOT / "configs" / "strategy" / f"{strategy}.yaml")]
    args += ["--trainer.devices", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
    rows = [row for p in directory.rglob("metrics.csv") for row in csv.DictReader(p.open())]
    speed = [float(r["train/device/items_per_sec"]) for r in rows if r.get("train/device/items_per_sec")]
    if not speed:
        return {"error": "no throughput logged (ThroughputMonitor needs 50 steps)"}
    figures = {"tokens_per_sec": round(statistics.median(speed), 1)}
    printed = done.stdout + done.stderr  # PeakMemory also prints "[distill] peak_allocated_gb = 1.2, ..."
    for key in ("peak_allocated_gb", "peak_reserved_gb", "peak_rss_gb"):
        values = [float(r[f"memory/{key}"]) for r in rows if r.get(f"memory/{key}")]
        values += [float(v) for v in re.findall(rf"{key} = ([0-9.]+)", printed)]
        if values:
            figures[key] = values[-1]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    figures["val_loss"] = round(val[-1], 4) if val else None
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    require_teacher()
    figures = {"device": device_name(), "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            figures[name] = run(name, Path(tmp) / name, Path(tmp) / "cache", args.steps)
            print(name, figures[name], flush=True)
    base = figures.get("bf16", {})
    for name in args.variants:
        ours = figures[name]
        if name != "bf16" and "tokens_per_sec" in ours and "tokens_per_sec" in base:
            figures[f"{name}_vs_bf16_speed"] = round(ours["tokens_per_sec"] / base["tokens_per_sec"], 3)
            if "peak_allocated_gb" in ours and base.get("peak_allocated_gb"):
                ratio = ours["peak_allocated_gb"] / base["peak_allocated_gb"]
                figures[f"{name}_vs_bf16_memory"] = round(ratio, 3)
    result(figures)


if __name__ == "__main__":
    main()
