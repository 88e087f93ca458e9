"""Shared bits of the benchmarks: the bundled assets, peak memory, the one-line JSON result."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "distill" / "assets"
TEACHER = ASSETS / "teacher"
TOKENIZER = ASSETS / "tokenizer"
DATA = ASSETS / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))  # run as `python benchmarks/x.py` from a checkout


def require_teacher() -> None:
    if not (TEACHER / "model.safetensors").exists():
        raise SystemExit(f"{TEACHER} is missing: build it with `python scripts/train_teacher.py`")


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def result(values: dict) -> None:
    """The benchmark's last line: one JSON object."""
    print(json.dumps(values), flush=True)


def kd_and_sft_configs(
    cache_dir: Path, steps: int, same_batches: bool = False, **data_overrides
) -> dict[str, dict]:
    """The demo KD config and the same run as plain SFT: same student, data, batch, seed and steps.

    ``same_batches``: SFT reads its batches through the KD data module too (the targets are there but
    unused), so both runs see identical batches in identical order and only the objective differs."""
    import yaml

    kd = yaml.safe_load((ROOT / "configs" / "kd.yaml").read_text())
    kd["trainer"].update(
        max_steps=steps,
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(cache_dir / "runs"),
    )
    kd["data"]["init_args"].update(cache_dir=str(cache_dir / "kd-cache"), **data_overrides)
    sft = yaml.safe_load(yaml.safe_dump(kd))
    chunk = kd["model"]["init_args"]["objective"]["init_args"].get("chunk_size", 1024)
    sft["model"]["init_args"]["objective"] = {
        "class_path": "distill.objectives.CrossEntropy",
        "init_args": {"chunk_size": chunk},  # the same logits chunking as KD
    }
    if not same_batches:
        sft["data"]["class_path"] = "distill.DataModule"
        for key in ("teachers", "sparsity", "cache_dir", "cache_size_gb", "value_bits"):
            sft["data"]["init_args"].pop(key, None)
    return {"kd": kd, "sft": sft}


def demo_config(name: str, directory: Path) -> dict:
    """``configs/<name>`` as it is, but writing only into ``directory``: CSV logs, no export or
    checkpoints."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    config["trainer"].update(
        default_root_dir=str(directory / "runs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(directory)},
        },
    )
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if "HFExport" not in str(c) and "Checkpoint" not in str(c)
    ]
    return config


def build(config: dict, directory: Path):
    """A DistillCLI (not run) from a config dict, with paths relative to the repository."""
    import yaml

    from distill.cli import run_cli

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    os.chdir(ROOT)
    return run_cli(["--config", str(path)], run=False)


@torch.no_grad()
def held_out_perplexity(
    model: torch.nn.Module, tokenizer, max_length: int = 256, template: str | None = "mistral"
) -> float:
    """exp(mean cross-entropy) on the assistant tokens of chat_val.jsonl (``template``; None: the
    tokenizer's own)."""
    import math

    import torch.nn.functional as F

    from distill.data.batching import Collator
    from distill.data.encoding import IGNORE_INDEX, encode_all
    from distill.data.formats import read_records
    from distill.data.templates import resolve_template

    records = read_records([DATA / "chat_val.jsonl"])
    samples, _ = encode_all(
        records,
        tokenizer,
        resolve_template(tokenizer, template),
        max_length,
        "right",
        train_on_responses_only=True,
    )
    collate = Collator(tokenizer.pad_token_id)
    loss, tokens = 0.0, 0
    model.eval()
    for start in range(0, len(samples), 16):
        batch = collate(samples[start : start + 16])
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        labels = batch.labels[:, 1:]
        loss += float(
            F.cross_entropy(
                logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        tokens += int((labels != IGNORE_INDEX).sum())
    return math.exp(loss / tokens)


class StepTime(L.Callback):
    """Wall time of the training steps (batch start to batch end), validation left out."""

    def __init__(self) -> None:
        self.seconds, self.start = 0.0, 0.0

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.seconds += time.perf_counter() - self.start
