"""Pruning a saved causal LM end to end: check the targets, measure importance on calibration samples of
the data module, slice, save a plain Hugging Face model with the teacher's tokenizer and
``importance.json``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig

from distill.data.datamodule import DataModule
from distill.pretrained import load_tokenizer, pretrained_source
from distill.prune.apply import count_params, prune_model
from distill.prune.importance import Importance, measure
from distill.prune.options import Pruning, PruningError
from distill.prune.selection import Kept, check_budget, choose
from distill.train.model import load_causal_lm

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# the bundled conversations, in the teacher's own chat template
NO_TARGETS = Pruning()
DEMO_DATA = {"train_files": str(ASSETS / "data" / "chat_train.jsonl"), "max_seq_length": 256}


def prune(model: str, output: str, pruning: Pruning = NO_TARGETS, data: dict[str, Any] | None = None) -> None:
    """Prune ``model`` (a directory or hub id of a Llama, Mistral or Qwen2 causal LM) into ``output``.

    Args:
        model: The model to prune (its tokenizer and chat template are copied to ``output``).
        output: A new (or empty) directory for the pruned model and ``importance.json``.
        pruning: The targets (``Pruning``'s fields: none set prunes nothing).
        data: ``distill.DataModule`` arguments of the calibration data (its training split; the model's
            tokenizer); default: the bundled conversations.
    """
    source, located = pretrained_source(model)  # a directory, a hub name or a .gguf file
    config = AutoConfig.from_pretrained(source, **located)
    pruning.check(config)
    check_budget(config, pruning)
    if Path(output).exists() and any(Path(output).iterdir()):
        raise PruningError(f"--output {output} exists and is not empty: choose a new directory or empty it")
    data_module = calibration_data(model, data, pruning.calibration_samples)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model)
    original = load_causal_lm(model, None, tokenizer, dtype="float32", role="teacher").to(device).eval()
    batches = DataLoader(
        data_module.train[: pruning.calibration_samples],
        batch_size=data_module.batch_size,
        collate_fn=data_module.collator,
    )
    importance = measure(original, batches, pruning.depth_metric)
    kept = choose(importance, pruning, config)
    pruned = prune_model(original, kept)
    seconds = time.perf_counter() - started
    pruned.to(getattr(config, "dtype", None) or torch.float32).save_pretrained(output)
    tokenizer.save_pretrained(output)
    before, after = count_params(original), count_params(pruned)
    report = scores(importance, kept, pruning)
    report.update(params_before=before, params_after=after, seconds=round(seconds, 3), model=model)
    (Path(output) / "importance.json").write_text(json.dumps(report, indent=1) + "\n")
    log(
        f"{model} -> {output}: {before:,} -> {after:,} parameters ({after / before:.1%}), layers kept "
        f"{kept.layers} of {config.num_hidden_layers} ({importance.metric} scores "
        f"{[round(s, 4) for s in importance.layers]}), {pruned.config.intermediate_size} MLP channels, "
        f"{pruned.config.num_attention_heads} heads, hidden {pruned.config.hidden_size}; {seconds:.1f} s "
        f"on {len(data_module.train[: pruning.calibration_samples])} calibration samples"
    )


def calibration_data(model: str, data: dict[str, Any] | None, samples: int) -> DataModule:
    """The data module's encoded training samples, in ``model``'s tokenizer (at most ``samples`` read)."""
    arguments = {**(data or DEMO_DATA), "tokenizer": model}
    arguments.setdefault("max_train_samples", samples)
    try:
        data_module = DataModule(**arguments)
    except TypeError as error:
        raise PruningError(f"data: {error} (the keys are distill.DataModule's arguments)") from None
    data_module.setup("fit")
    return data_module


def scores(importance: Importance, kept: Kept, pruning: Pruning) -> dict[str, Any]:
    """What ``importance.json`` holds: every score, and the indices kept (of the original model)."""
    return {
        "pruning": {k: v for k, v in vars(pruning).items()},
        "layers": {"metric": importance.metric, "scores": importance.layers, "kept": kept.layers},
        "attention_groups": {
            "scores": [s.tolist() for s in importance.groups],
            "kept": [kept.groups[i].tolist() for i in kept.layers],
        },
        "mlp_channels": {
            "scores": [s.tolist() for s in importance.channels],
            "kept": [kept.channels[i].tolist() for i in kept.layers],
        },
        "hidden": {"scores": importance.hidden.tolist(), "kept": kept.hidden.tolist()},
    }


def log(message: str) -> None:
    print(f"[prune] {message}", file=sys.stderr, flush=True)
