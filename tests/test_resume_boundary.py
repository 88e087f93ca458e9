"""Exact resume of a plain SFT fit killed at an epoch boundary: after the last batch of an epoch."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.helpers import (
    check_killed_fit_resumes,
    conversation,
    with_last_checkpoint,
    write_config,
    write_jsonl,
)


def test_sft_fit_killed_after_the_last_batch_of_an_epoch_resumes_exactly(tmp_path):
    """24 samples in batches of 4, none held out: 6 steps per epoch. The last checkpoint is the one
    after step 5, the last batch of epoch 0; killed at step 6 and resumed, the fit must train epoch 1
    from its first batch, as the uninterrupted run does."""
    steps = ["--trainer.max_steps", "10", "--trainer.enable_checkpointing", "true"]

    def config_in(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        train = write_jsonl(directory / "train.jsonl", [conversation(i, turns=1 + i % 3) for i in range(24)])
        config = yaml.safe_load(
            write_config(directory, train, val_fraction=0.0, max_seq_length=96).read_text()
        )
        return with_last_checkpoint(config, directory)

    check_killed_fit_resumes(tmp_path, config_in, steps)
