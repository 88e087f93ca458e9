"""Progress a user can follow (plain lines in a log, the step bar on a terminal) and FLOPs for MFU."""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from distill.callbacks import LoopProgress
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from torch.utils.flop_counter import FlopCounterMode

from distill import LoraOptions, StudentModule
from distill.cli import main, run_cli
from distill.data.batch import TokenBatch
from distill.train.flops import model_shape, transformer_flops
from tests.helpers import (
    TINY_LLAMA,
    TOKENIZER_DIR,
    clean_env,
    collect_config,
    conversation,
    logged_rows,
    run,
    write_config,
    write_jsonl,
)

SHORT_FIT = [
    "--data.init_args.max_seq_length",
    "96",
    "--trainer.val_check_interval",
    "6",
    "--trainer.check_val_every_n_epoch",
    "null",
    "--trainer.enable_progress_bar",
    "true",
]

TRAIN_LINE = re.compile(
    r"^\[distill\] step (\d+)/12 \((\d+)%\), loss ([\d.]+), lr ([\d.e-]+), ([\d,]+) tokens/s "
    r"\(([\d,]+) trained\), elapsed (\w+), ETA (\w+)$"
)


def test_a_log_file_gets_plain_progress_lines(tmp_path, chat_file):
    """Piped (no terminal) as under SLURM: a line at step 1, every 4 steps and at the end, each with its
    loss (the logged one), tokens/s and ETA; a line per validation; no bar and no ``Epoch 0/-2``. The
    fit spans three epochs of 5 batches."""
    config = write_config(tmp_path, chat_file)
    steps = ["--trainer.max_steps", "12", "--progress.every_n_steps", "4", "--progress.every_seconds", "600"]
    result = run(["fit", "--config", str(config), *steps, *SHORT_FIT], clean_env())
    lines = [line for line in result.stderr.splitlines() if re.match(r"\[distill\] (step|validation)", line)]
    train = [TRAIN_LINE.match(line) for line in lines if line.startswith("[distill] step")]
    assert all(train), lines
    assert [int(m[1]) for m in train] == [1, 4, 8, 12]
    assert [int(m[2]) for m in train] == [8, 33, 67, 100]
    assert [line.split(",")[0] for line in lines] == [
        "[distill] step 1/12 (8%)",
        "[distill] step 4/12 (33%)",
        "[distill] validation at step 6",
        "[distill] step 8/12 (67%)",
        "[distill] step 12/12 (100%)",
        "[distill] validation at step 12",
    ]
    logged = {int(r["step"]): float(r["train/loss"]) for r in logged_rows(tmp_path) if r.get("train/loss")}
    for m in train:  # the line's loss is the one logged at that step (step s is logged as s - 1)
        assert float(m[3]) == pytest.approx(logged[int(m[1]) - 1], rel=1e-3)
        tokens, trained = (int(m[i].replace(",", "")) for i in (5, 6))
        assert 0 < trained < tokens
    assert train[-1][8] == "0s" and all(m[8] != "?" for m in train)
    val_losses = [float(re.search(r"loss ([\d.]+)", line)[1]) for line in lines if "validation" in line]
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0]
    output = result.stdout + result.stderr
    assert "Epoch" not in output and "/-2" not in output and "\r" not in output


def test_teacher_collection_prints_batches_samples_per_second_and_eta(tmp_path, teacher_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(24)])
    config = collect_config(tmp_path, data, teacher_dir)
    args = ["--trainer.enable_progress_bar", "true", "--progress.every_n_steps", "2"]
    result = run(["collect", "--config", str(config), *args], clean_env())
    lines = [line for line in result.stderr.splitlines() if line.startswith("[distill] predict")]
    # 18 train samples in 5 batches of 4, then 6 val samples in 2
    done = [int(re.match(r"\[distill\] predict batch (\d+)/7 ", line)[1]) for line in lines]
    assert done == [1, 2, 4, 6, 7], lines
    assert ", dataloader 2/2," in lines[-1] and ", dataloader 1/2," in lines[0]
    rates = r"[\d.]+ samples/s, [\d,]+ tokens/s \([\d,]+ with labels\), elapsed \w+, ETA \w+$"
    assert all(re.search(rates, line) for line in lines), lines
    assert lines[-1].endswith("ETA 0s")


def test_a_terminal_bar_of_a_step_limited_fit_counts_steps(tmp_path, chat_file, capsys):
    config = write_config(tmp_path, chat_file)
    args = ["--trainer.max_steps", "6", "--progress.lines", "false", *SHORT_FIT]
    main(["fit", "--config", str(config), *args])
    out = capsys.readouterr().out
    assert "step 6/6: 100%" in out  # one bar over the fit's two epochs
    assert "Epoch" not in out and "/-2" not in out


def test_the_bar_description_says_step_or_epoch():
    bar = LoopProgress()
    bar._trainer = SimpleNamespace(max_steps=500, max_epochs=-1, global_step=120, current_epoch=4)
    assert bar.train_description == "step 120/500"
    bar._trainer = SimpleNamespace(max_steps=-1, max_epochs=3, global_step=120, current_epoch=1)
    assert bar.train_description == "epoch 2/3"
    bar._trainer = SimpleNamespace(max_steps=500, max_epochs=3, global_step=120, current_epoch=1)
    assert bar.train_description == "epoch 2/3"  # epochs may end it first: a bar per epoch
    with pytest.raises(ValueError, match="every_n_steps or every_seconds"):
        LoopProgress(every_n_steps=None, every_seconds=None)


def test_a_line_is_due_every_n_steps_or_after_s_seconds(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    bar = LoopProgress(every_n_steps=50, every_seconds=30)
    bar._start_step, bar._total_steps = 40, 500  # resumed at step 40
    bar._reset_counts(100.0)  # a line just printed

    def due(step: int) -> bool:
        return bar._train_line_due(SimpleNamespace(global_step=step))

    assert due(41) and not due(42) and due(50) and due(100) and due(500) and not due(499)
    clock[0] = 129.0
    assert not due(77)
    clock[0] = 130.0
    assert due(77)


def progress_bars(args: list[str]) -> list[ProgressBar]:
    cli = run_cli(args, run=False)
    return [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]


def test_every_run_gets_one_progress_bar_unless_disabled(tmp_path, chat_file):
    config = str(write_config(tmp_path, chat_file))  # enable_progress_bar: false
    assert progress_bars(["--config", config]) == []
    (bar,) = progress_bars(["--config", config, "--trainer.enable_progress_bar", "true"])
    assert isinstance(bar, LoopProgress)
    # a config that lists its own progress bar keeps it, and only it
    rich = json.dumps({"class_path": "lightning.pytorch.callbacks.RichProgressBar"})
    (bar,) = progress_bars(
        ["--config", config, "--trainer.enable_progress_bar", "true", "--trainer.callbacks+", rich]
    )
    assert isinstance(bar, RichProgressBar)


# ---- FLOPs ----------------------------------------------------------------------------------------


def student(lora: LoraOptions | None = None, layers: int = 2) -> StudentModule:
    # wider than TINY_LLAMA, so that the layers and attention weigh beside the 32,000-row head; eager
    # attention: FlopCounterMode counts its matmuls (it has no formula for SDPA's CPU kernel)
    config = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers}
    module = StudentModule(
        model_config={**config, "attn_implementation": "eager"}, tokenizer=str(TOKENIZER_DIR), lora=lora
    )
    module.configure_model()
    return module


def counted_flops(module: StudentModule, batch: TokenBatch) -> tuple[int, int]:
    """FlopCounterMode's forward and backward FLOPs of the student's path: the layers at every position,
    the head only at positions that carry loss."""
    with FlopCounterMode(display=False) as forward:
        hidden = module.forward_hidden(batch)
        labels = batch.labels[:, 1:]
        trained = labels != -100
        logits = module.causal_lm.get_output_embeddings()(hidden[:, :-1][trained])
        loss = F.cross_entropy(logits, labels[trained], reduction="sum")
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops(), backward.get_total_flops()


def tiny_batch(rows: int = 3, seq_len: int = 128, prompt: int = 120) -> tuple[TokenBatch, int]:
    """A batch and its number of trained positions (each row's labels after its prompt)."""
    ids = torch.randint(3, 1000, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :prompt] = -100
    batch = TokenBatch(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))
    return batch, rows * (seq_len - prompt)


def test_flops_formula_matches_flop_counter_on_a_tiny_model():
    module = student()
    batch, trained = tiny_batch()
    shape = model_shape(module.causal_lm)
    # per layer: q and o (64 x 64), k and v (2 KV heads of 16: 64 x 32), gate, up and down (64 x 128)
    assert shape.body_params == shape.body_trainable == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert (shape.layers, shape.attention_width, shape.head_params) == (2, 64, 32000 * 64)
    forward, backward = counted_flops(module, batch)
    assert transformer_flops(shape, 3, 128, trained, backward=False) == pytest.approx(forward, rel=1e-3)
    assert transformer_flops(shape, 3, 128, trained) == pytest.approx(forward + backward, rel=1e-3)
    # the attention term (the only one quadratic in the sequence) is in both
    no_attention = transformer_flops(replace(shape, layers=0), 3, 128, trained)
    assert no_attention < 0.9 * (forward + backward)


def test_flops_of_lora_count_the_frozen_weights_backward_once():
    module = student(LoraOptions(r=4, alpha=8, dropout=0.0), layers=4)
    batch, trained = tiny_batch()
    shape = model_shape(module.causal_lm)
    adapters = sum(p.numel() for n, p in module.model.named_parameters() if "lora_" in n)
    assert shape.body_trainable == adapters and not shape.head_trainable
    forward, backward = counted_flops(module, batch)
    assert transformer_flops(shape, 3, 128, trained, backward=False) == pytest.approx(forward, rel=1e-3)
    # what the formula leaves out: nothing before the first layer's Q, K, V (and their lora_A) trains, so
    # autograd skips their input gradients, 2 FLOPs per weight per token (1.1% here; 1/L of it at L layers)
    attention = module.causal_lm.model.layers[0].self_attn
    first = [getattr(attention, name).named_parameters() for name in ("q_proj", "k_proj", "v_proj")]
    skipped = 2 * 3 * 128 * sum(p.numel() for params in first for n, p in params if "lora_B" not in n)
    assert transformer_flops(shape, 3, 128, trained) - skipped == pytest.approx(forward + backward, rel=1e-3)
    full = transformer_flops(student(layers=4).flops_shape, 3, 128, trained)
    assert transformer_flops(shape, 3, 128, trained) < 0.8 * full


def per_token_flops(rows: list[dict], stage: str) -> list[float]:
    """FLOPs/s over tokens/s in each logged row of ``stage``: with a window of 2, the FLOPs per token
    (padding included, as the tokens are) of the row's last batch."""
    flops, items = f"{stage}/device/flops_per_sec", f"{stage}/device/items_per_sec"
    return [float(r[flops]) / float(r[items]) for r in rows if r.get(flops)]


def test_throughput_monitor_gets_flops_per_batch(tmp_path, chat_file):
    config = write_config(tmp_path, chat_file)
    throughput = {"class_path": "distill.callbacks.TokenThroughput", "init_args": {"window_size": 2}}
    every_2 = ["--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null"]
    args = ["--trainer.max_steps", "4", "--trainer.callbacks+", json.dumps(throughput), *every_2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(["fit", "--config", str(config), *args, *SHORT_FIT[:2]])
    assert not [w for w in caught if "flops_per_batch" in str(w.message)]
    rows = logged_rows(tmp_path)
    train, val = per_token_flops(rows, "train"), per_token_flops(rows, "validate")
    assert len(train) == 3 and len(val) == 2  # from a stage's second batch on (2 validation batches)
    # validation: forward FLOPs of its second batch, exactly
    shape = cli.model.flops_shape
    batch = list(cli.datamodule.val_dataloader())[1]
    trained = int((batch.labels[:, 1:] != -100).sum())
    forward = transformer_flops(shape, *batch.input_ids.shape, trained, backward=False)
    assert val == pytest.approx([forward / batch.input_ids.numel()] * 2, rel=1e-6)
    # training: forward and backward, about three times the forward of a like batch (not 1x: a stale or
    # forward-only count); their shares of trained positions differ, so not exactly 3x
    assert all(2 < t / val[0] < 5 for t in train), (train, val)
    assert not any(r.get("train/device/mfu") for r in rows)  # no peak FLOPs known for a CPU


def test_work_outside_the_loops_prints_lines_with_rate_and_eta_in_a_log(monkeypatch):
    import io
    import itertools

    from distill import progress as progress_module
    from distill.progress import Progress

    # each check, then each line, reads the clock
    clock = itertools.chain([0.0, 10.0, 20.0, 45.0, 45.0, 50.0], itertools.repeat(60.0))
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    log = io.StringIO()  # not a terminal
    with Progress(1000, "encoding train records", "records", every_seconds=30, stream=log) as work:
        work.update(200)  # t=10: too soon for a line
        work.update(300)  # t=20: too soon
        work.update(400)  # t=45: a line
    lines = log.getvalue().splitlines()
    assert lines == [
        "[distill] encoding train records: 900/1,000 records (90%), 20 records/s, elapsed 45s, ETA 5s",
        "[distill] encoding train records: 900/1,000 records (90%), 18 records/s, elapsed 50s, ETA 6s",
    ]
    quiet = io.StringIO()
    with Progress(10, "x", enabled=False, stream=quiet) as work:
        work.update(10)
    assert quiet.getvalue() == ""
