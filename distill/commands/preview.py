"""``python -m distill inspect --config C.yaml``: show samples as the model will see them.

Masked label positions (no loss) are wrapped in ``[...]``; everything else is trained on.
"""

from __future__ import annotations

import argparse

from distill.cli import exit_codes, run_cli
from distill.data.encoding import encode_all, show_labels


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill inspect", description=__doc__)
    parser.add_argument("--num_samples", type=int, default=2, help="samples to show")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    own, rest = parser.parse_known_args(argv)
    with exit_codes():
        show(own.num_samples, own.split, rest)


def show(num_samples: int, split: str, config_args: list[str]) -> None:
    cli = run_cli(["--trainer.logger", "false", *config_args], run=False)
    data = cli.datamodule
    train, val = data.load_records()
    records = (train if split == "train" else val)[:num_samples]
    samples, stats = encode_all(
        records, data.tokenizer, data.template_for(records), data.max_seq_length, data.truncation,
        data.train_on_responses_only,
    )  # fmt: skip
    template = data.chat_template
    print(f"template: {template.name}, end of turn: {template.end_of_turn}" if template else "template: -")
    for sample in samples:
        print(
            f"\n=== {sample.source}  sha256 {sample.sha[:16]}  tokens {len(sample.input_ids)}  "
            f"trainable {sample.num_trainable}"
        )
        print(show_labels(sample, data.tokenizer))
    print(f"\nstats: {stats.as_dict()}")
