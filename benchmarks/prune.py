"""Does a student cut from its teacher learn faster than one of the same shape from scratch? (Minitron)

The bundled teacher is pruned with configs/prune.yaml's targets (6 -> 4 layers, MLP 512 -> 256, one of
two KV groups, hidden 128 -> 96), then trained for equal steps with the demo's configs/kd.yaml:
(a) KD from the teacher into the pruned student, (b) KD into a randomly initialised student of the same
shape, (c) SFT (cross-entropy only) of the pruned student. Held-out perplexity is measured on the
assistant tokens of chat_val.jsonl for the teacher and every student with the same code.

    python benchmarks/prune.py [--steps 300]

Last line: one JSON object with ppl_teacher, ppl_pruned_before, ppl_pruned_kd, ppl_random_kd,
ppl_pruned_sft, params_ratio, prune_seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import (
    DATA,
    ROOT,
    TEACHER,
    build,
    device_name,
    held_out_perplexity,
    kd_and_sft_configs,
    require_teacher,
    result,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

SHAPE = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps",
)  # fmt: skip


def train(config: dict, directory: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    cli = build(config, directory)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model.model


def starting_from(config: dict, pruned: Path, shape: dict | None) -> dict:
    """A copy of ``config`` training the pruned model, or (``shape``) a fresh one of its shape; both with
    the pruned model's tokenizer (the teacher's), so both KD runs read the same cached targets."""
    config = copy.deepcopy(config)
    args = config["model"]["init_args"]
    args.update(model=None if shape else str(pruned), model_config=shape, tokenizer=str(pruned))
    args["dtype"] = "float32"  # the pruned model is saved in the teacher's bfloat16; train both alike
    return config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--cache_dir", default=None, help="the teacher's KD targets (default: a temporary one)"
    )
    args = parser.parse_args()
    require_teacher()
    from distill.prune.options import Pruning
    from distill.prune.run import prune

    options = yaml.safe_load((ROOT / "configs" / "prune.yaml").read_text())
    options["data"]["train_files"] = str(DATA / "chat_train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    start = time.perf_counter()
    ppl = {}
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / "pruned"
        began = time.perf_counter()
        prune(str(TEACHER), str(pruned), Pruning(**options["pruning"]), options["data"])
        prune_seconds = time.perf_counter() - began
        report = json.loads((pruned / "importance.json").read_text())
        for name, path in (("teacher", TEACHER), ("pruned_before", pruned)):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            ppl[name] = held_out_perplexity(model, tokenizer)
        config = AutoConfig.from_pretrained(pruned).to_dict()
        shape = {key: config[key] for key in SHAPE}
        configs = kd_and_sft_configs(Path(tmp), args.steps)
        if args.cache_dir:
            configs["kd"]["data"]["init_args"]["cache_dir"] = args.cache_dir
        runs = {"pruned_kd": ("kd", None), "random_kd": ("kd", shape), "pruned_sft": ("sft", None)}
        for name, (mode, fresh) in runs.items():
            student = train(starting_from(configs[mode], pruned, fresh), Path(tmp) / name)
            ppl[name] = held_out_perplexity(student, tokenizer)
    ratio = report["params_after"] / report["params_before"]
    print(
        f"device: {device_name()}; pruned {report['params_before']:,} -> {report['params_after']:,} "
        f"parameters in {prune_seconds:.1f} s; {args.steps} steps each, "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    wins = ppl["pruned_kd"] < min(ppl["random_kd"], ppl["pruned_sft"])
    print(
        "held-out perplexity (chat_val assistant tokens): "
        + ", ".join(f"{name} {value:.2f}" for name, value in ppl.items())
        + f" (pruned + KD {'beats' if wins else 'does NOT beat'} random + KD and pruned + SFT)"
    )
    result(
        {
            **{f"ppl_{name}": round(value, 3) for name, value in ppl.items()},
            "params_ratio": round(ratio, 4),
            "prune_seconds": round(prune_seconds, 2),
        }
    )


if __name__ == "__main__":
    main()
