"""Does distillation transfer knowledge? The bundled teacher distilled into a smaller student vs the
same student trained with cross-entropy only: equal steps, seed, data and batches.

Both runs use the demo's ``configs/kd.yaml`` (a ~2.3M-parameter student, 5.6M-parameter teacher, the
bundled conversations, loss on assistant tokens); SFT swaps the objective for plain cross-entropy on
the labels. Held-out perplexity is measured on the assistant tokens of chat_val.jsonl for the
teacher and both students with the same code.

    python benchmarks/quality.py [--steps 300]

Last line: one JSON object with ppl_teacher, ppl_sft, ppl_kd.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    TEACHER,
    build,
    device_name,
    held_out_perplexity,
    kd_and_sft_configs,
    require_teacher,
    result,
)
from transformers import AutoModelForCausalLM, AutoTokenizer


def train(config: dict, directory: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    cli = build(config, directory)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model.model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    require_teacher()
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    start = time.perf_counter()
    ppl = {
        "teacher": held_out_perplexity(
            AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32), tokenizer
        )
    }
    with tempfile.TemporaryDirectory() as tmp:
        configs = kd_and_sft_configs(Path(tmp), args.steps)
        for mode in ("sft", "kd"):
            ppl[mode] = held_out_perplexity(train(configs[mode], Path(tmp) / mode), tokenizer)
    print(f"device: {device_name()}; {args.steps} steps each, {time.perf_counter() - start:.0f} s in all")
    print(
        f"held-out perplexity (chat_val assistant tokens): teacher {ppl['teacher']:.2f}, "
        f"student SFT {ppl['sft']:.2f}, student KD {ppl['kd']:.2f} "
        f"({'KD wins' if ppl['kd'] < ppl['sft'] else 'KD does NOT win'})"
    )
    result(
        {
            "ppl_teacher": round(ppl["teacher"], 3),
            "ppl_sft": round(ppl["sft"], 3),
            "ppl_kd": round(ppl["kd"], 3),
        }
    )


if __name__ == "__main__":
    main()
