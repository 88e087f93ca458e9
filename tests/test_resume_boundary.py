"""Exact resume of a plain SFT fit killed at an epoch boundary, its last checkpoint taken after the
epoch's last batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    check_killed_fit_resumes,
    conversation,
    with_last_checkpoint,
    write_config,
    write_jsonl,
)


@pytest.mark.parametrize("epoch_batches", [3])  # kill after epoch 1; 6-9 span epochs 2 and 3
def test_sft_fit_killed_after_the_last_batch_of_an_epoch_resumes_exactly(tmp_path, epoch_batches):
    """Batches of 4, none held out. Killed at step 6 with its last checkpoint after step 5, the last
    batch of an epoch (epoch 0 of 6 batches; epoch 1 of 3), the resumed fit must train the next epoch
    from its first batch in that epoch's order, and with 3 batches go on into the epoch after it (step
    9), as the uninterrupted run does."""
    steps = ["--trainer.max_steps", "10", "--trainer.enable_checkpointing", "true"]
    samples = [conversation(i, turns=1 + i % 3) for i in range(4 * epoch_batches)]

    def config_in(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        train = write_jsonl(directory / "train.jsonl", samples)
        config = yaml.safe_load(
            write_config(directory, train, val_fraction=0.0, max_seq_length=96).read_text()
        )
        return with_last_checkpoint(config, directory)

    check_killed_fit_resumes(tmp_path, config_in, steps)
