"""Exact mid-epoch resume of plain SFT/PT fits: per-(seed, epoch) batch order, ranks, workers, skips."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from distill import DataModule, LoraOptions, StudentModule
from distill.data.resume import ResumableLoader, ShuffledBatches
from tests.helpers import (
    TINY_LLAMA,
    TOKENIZER_DIR,
    check_killed_fit_resumes,
    clean_env,
    conversation,
    losses,
    run,
    with_last_checkpoint,
    write_config,
    write_jsonl,
)


def batches(n: int, batch_size: int = 4, epoch: int = 0, skip: int = 0, **kwargs) -> list[list[int]]:
    """The rows 0..n-1 of one epoch, as ``ShuffledBatches`` yields them in the main process."""
    stream = ShuffledBatches(list(range(n)), list, batch_size, seed=7, **kwargs)
    stream.epoch, stream.skip = epoch, skip
    return list(stream)


def test_the_order_is_a_function_of_seed_and_epoch():
    assert batches(22) == batches(22)
    assert batches(22, epoch=1) == batches(22, epoch=1) != batches(22)
    other_seed = ShuffledBatches(list(range(22)), list, 4, seed=8)
    assert list(other_seed) != batches(22)


def test_one_rank_takes_every_row_once_per_epoch():
    for epoch in range(3):
        got = batches(22, epoch=epoch)
        assert [len(b) for b in got] == [4, 4, 4, 4, 4, 2]  # the last batch is partial, not dropped
        assert sorted(r for b in got for r in b) == list(range(22))
    assert len(ShuffledBatches(list(range(22)), list, 4, seed=7)) == 6


def test_ranks_take_disjoint_rows_and_equal_batch_counts():
    for epoch in range(3):
        shards = [batches(23, epoch=epoch, rank=r, world_size=2) for r in range(2)]
        rows = [{r for b in shard for r in b} for shard in shards]
        assert [len(s) for s in shards] == [3, 3] and [len(r) for r in rows] == [11, 11]
        assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == 22  # one row left out, for equal steps
    stream = ShuffledBatches(list(range(23)), list, 4, seed=7, rank=1, world_size=2)
    assert len(stream) == 3


def test_skip_yields_exactly_the_batches_after_the_first_k():
    full = batches(22, epoch=2)
    for k in (0, 1, 3, 6):
        assert batches(22, epoch=2, skip=k) == full[k:]


@pytest.mark.parametrize("skip", [0, 3])
def test_workers_yield_the_batches_of_one_process_in_order(skip):
    """Batches are dealt round-robin over workers from the first one after the skipped ones, so the
    DataLoader, which reads the workers in turn, returns them in order."""

    def loaded(num_workers: int, epoch: int) -> list[list[int]]:
        loader = ResumableLoader(
            ShuffledBatches(list(range(30)), list, 4, seed=7), lambda: (epoch, 0), num_workers=num_workers
        )
        loader.load_state_dict({"epoch": 1, "batches": skip})
        return list(loader)

    assert loaded(2, epoch=1) == loaded(0, epoch=1) == batches(30, epoch=1)[skip:]
    assert loaded(2, epoch=0) == batches(30, epoch=0)  # a state of another epoch skips nothing


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_data_module_loader_resumes_after_the_trained_batches(tmp_path, packing):
    train = write_jsonl(tmp_path / "train.jsonl", [conversation(i, turns=1 + i % 3) for i in range(20)])
    data = DataModule(
        str(train),
        tokenizer=str(TOKENIZER_DIR),
        template="mistral",
        max_seq_length=96,
        packing=packing,
        batch_size=2,
    )
    data.setup("fit")
    loader = data.train_dataloader()
    full = list(loader)
    assert len(full) == len(loader) >= 4
    assert all((b.attention_mask is not None) != packing for b in full)
    if not packing:
        assert sorted(s for b in full for s in b.shas) == sorted(s.sha for s in data.train)
    loader.load_state_dict({"epoch": 0, "batches": 3})
    resumed = list(loader)
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(full[3:], resumed, strict=True))


def test_a_sft_fit_killed_mid_epoch_and_after_an_epochs_last_batch_resumes_exactly(tmp_path):
    """12 samples in batches of 4, none held out: 3 steps an epoch. Killed at step 4 (its last checkpoint
    after step 3, mid-epoch 1) and resumed with ``--ckpt_path last``, the fit trains on across the epoch
    boundary until killed again at step 9, its last checkpoint after step 8, the last batch of epoch 2;
    resumed again, it must train epoch 3 from its first batch in that epoch's order and go on into epoch
    4. Every resumed step has the loss of the uninterrupted 13-step run: the very batches it trained.
    (Packed rows take the same loader: the in-process test above covers them.)"""
    steps = ["--trainer.max_steps", "13", "--trainer.enable_checkpointing", "true"]
    samples = [conversation(i, turns=1 + i % 3) for i in range(12)]

    def config_in(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        train = write_jsonl(directory / "train.jsonl", samples)
        config = yaml.safe_load(
            write_config(directory, train, val_fraction=0.0, max_seq_length=96).read_text()
        )
        return with_last_checkpoint(config, directory)

    run(["fit", "--config", str(config_in("reference")), *steps], clean_env())
    resumed = config_in("resumed")
    for kill, resume in ((4, []), (9, ["--ckpt_path", "last"])):
        probe = {"class_path": "tests.probes.KillAt", "init_args": {"step": kill}}
        args = ["fit", "--config", str(resumed), *steps, *resume, "--trainer.callbacks+", json.dumps(probe)]
        killed = run(args, clean_env(), check=False)
        assert killed.returncode == -9, killed.stderr[-3000:]
    run(["fit", "--config", str(resumed), *steps, "--ckpt_path", "last"], clean_env())
    want = losses(tmp_path / "reference")
    assert sorted(want) == list(range(13))
    # each process logged from where the last one's checkpoint left off, not from scratch
    for version, logged in enumerate((range(4), range(4, 9), range(9, 13))):
        (log,) = (tmp_path / "resumed").rglob(f"version_{version}")
        got = losses(log)
        assert sorted(got) == list(logged)
        assert all(abs(want[s] - got[s]) < 1e-5 for s in got), {s: (want[s], got[s]) for s in got}


def test_killed_streaming_pt_fit_resumes_at_the_exact_row(tmp_path):
    """A streamed corpus read by two DataLoader workers, in rows of 48 tokens: killed at step 6 and
    resumed, the fit trains the rows the uninterrupted run trained (the cursors, not a replay)."""
    steps = ["--trainer.max_steps", "10", "--trainer.enable_checkpointing", "true"]
    texts = [
        {"text": f"Document {i}: " + " ".join(f"word{i * 7 + j}" for j in range(5 + i % 9))}
        for i in range(40)
    ]

    def config_in(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        train = write_jsonl(directory / "corpus.jsonl", texts)
        config = yaml.safe_load(
            write_config(
                directory,
                train,
                val_fraction=0.0,
                max_seq_length=48,
                streaming=True,
                num_workers=2,
                template=None,
                train_on_responses_only=False,
            ).read_text()
        )
        return with_last_checkpoint(config, directory)

    check_killed_fit_resumes(tmp_path, config_in, steps)


class Stopped(Exception):
    pass


class StepLosses(Callback):
    """Each optimizer step's training loss (of its one micro-batch), as computed; stops at ``stop``."""

    def __init__(self, stop: int | None = None) -> None:
        self.stop = stop
        self.losses: dict[int, float] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.stop:
            raise Stopped

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step - 1] = outputs["loss"].item()


@pytest.mark.parametrize("stop", [3, 4], ids=["mid-epoch", "at-epoch-end"])
def test_a_resumed_fit_draws_the_dropout_masks_of_an_uninterrupted_run(tmp_path, stop):
    """LoRA dropout 0.5, 4 batches per epoch. Stopped before step ``stop`` and resumed from last.ckpt, the
    fit computes the very losses of the uninterrupted run: each step's randomness is a function of its
    place in the run (the global generators were left as the resumed process had them)."""
    train = write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(8)])

    def fit(name: str, stop: int | None = None, ckpt_path: str | None = None) -> dict[int, float]:
        data = DataModule(
            str(train), tokenizer=str(TOKENIZER_DIR), template="mistral", max_seq_length=64, batch_size=2
        )
        lora = LoraOptions(r=4, alpha=8, dropout=0.5)
        module = StudentModule(model_config=TINY_LLAMA, tokenizer=str(TOKENIZER_DIR), lora=lora)
        losses = StepLosses(stop)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=6,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ModelCheckpoint(tmp_path / name, every_n_train_steps=1, save_last=True), losses],
        )
        torch.manual_seed(0)  # the same initial weights
        with contextlib.suppress(Stopped):
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)  # our own file
        return losses.losses

    want = fit("reference")
    assert sorted(want) == list(range(6))
    assert sorted(fit("run", stop=stop)) == list(range(stop))
    got = fit("run", ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    assert sorted(got) == list(range(stop, 6))
    assert all(got[s] == want[s] for s in got), {s: (want[s], got[s]) for s in got}
