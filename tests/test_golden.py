"""Golden figures: every shipped config that runs on a CPU offline, replayed for a few steps with its seed,
must log the values recorded in ``golden_losses.json`` (relative tolerance 1e-5, fp32 on a CPU).

A training config runs 5 optimizer steps and gives its first 5 ``train/loss`` values and one ``val/loss``
(2 validation batches, after step 5); ``collect.yaml`` trains nothing and gives instead the teacher's NLL
per position and the stored-vs-exact KL of the cache it writes (``python -m distill cache stats``). Each
entry's ``args`` are the exact command line (``{tmp}`` stands for the run's own directory): the config as
README composes it, plus caps on data and steps and everything written moved under ``{tmp}``.

This guards refactors: a change that is meant to keep behaviour must leave every figure as recorded.
When a change fixes a defect and thereby legitimately changes a figure (or changes an entry's ``args``),
regenerate that entry in the same commit and say so in the commit message:

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m tests.test_golden NAME [NAME ...]   # no NAME: all

An option that a refactor only renames: edit its name in ``RUNS`` and in the entry's ``args`` alike and
keep the figures. Never regenerate to make a refactor pass: a figure that moved is the behaviour that
moved. The figures were recorded on commit 2f5ec01 (before issue 26's redesign); they replay the same
with 1 or 2 torch threads and in either pytest-xdist worker. A first step at lr 0 (warmup) logs the same
loss twice, and GRPO/RLOO log 0.0 while every group's rewards are equal: both as the configs behave.
Out of scope: ``configs/pipelines/*.yaml`` chain these stage configs (each covered here on its own),
``configs/overrides/`` and ``configs/strategy/`` are fragments to compose, and the configs in ``SKIPPED``
cannot run on a CPU offline or are not fit configs.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, clean_env, losses_named, run, save_tiny_teacher

GOLDEN = Path(__file__).with_name("golden_losses.json")

STEPS = 5

TOLERANCE = 1e-5

TINY_TEACHER = "{tmp}/tiny-teacher"
"""A second teacher that an entry may name: written before the run (``save_tiny_teacher``, seed 0)."""

FIT = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    f"--trainer.max_steps={STEPS}",
    "--trainer.log_every_n_steps=1",
    f"--trainer.val_check_interval={STEPS}",
    "--trainer.check_val_every_n_epoch=null",
    "--trainer.limit_val_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_checkpointing=false",
    # the shipped callbacks export, checkpoint and measure: none changes what is trained
    "--trainer.callbacks=[]",
    "--trainer.default_root_dir={tmp}/runs",
    "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
    "--trainer.logger.init_args.save_dir={tmp}/logs",
]


def data(train: int, val: int, batch: int, seq: int | None = None) -> list[str]:
    """Caps on records (``val``: two validation batches), rows per batch and, where the data module has
    one, ``max_seq_length``: a few seconds of CPU per run."""
    args = [f"--data.init_args.max_train_samples={train}", f"--data.init_args.max_eval_samples={val}"]
    args += [f"--data.init_args.batch_size={batch}"]
    return args + ([f"--data.init_args.max_seq_length={seq}"] if seq else [])


def fit(*names: str) -> list[str]:
    """``fit`` of the configs ``names`` composed in order (README's way), then ``FIT``."""
    return ["fit", *(arg for name in names for arg in ("--config", f"configs/{name}.yaml")), *FIT]


KD_CACHE = "--data.init_args.cache_dir={tmp}/cache"

RUNS: dict[str, list[str]] = {
    "collect": [
        "predict",
        "--config=configs/collect.yaml",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.default_root_dir={tmp}/runs",
        "--trainer.callbacks.init_args.path={tmp}/cache/train",
        "--trainer.callbacks.init_args.val_path={tmp}/cache/val",
        *data(8, 8, 4, 128),
    ],
    "pt": [*fit("pt"), *data(40, 4, 2, 128)],
    "sft": [*fit("sft"), *data(20, 8, 4, 128)],
    # bf16-mixed autocast on a CPU rounds differently from one CPU to the next: fp32 here
    "teacher_pretrain": [*fit("teacher_pretrain"), "--precision=32-true", *data(40, 4, 2, 128)],
    "kd": [*fit("kd"), KD_CACHE, *data(10, 4, 2, 128)],
    "kd_onpolicy": [
        *fit("kd_onpolicy"),
        "--model.init_args.objective.init_args.sampling.max_new_tokens=16",
        *data(20, 8, 4),
    ],
    "dpo": [*fit("dpo"), *data(10, 4, 2, 128)],
    "rm": [*fit("rm"), *data(10, 4, 2, 128)],
    "grpo": [*fit("grpo"), *data(10, 4, 2)],
    "rloo": [*fit("rloo"), *data(10, 4, 2)],
    "examples/ipo": [*fit("dpo", "examples/ipo"), *data(10, 4, 2, 128)],
    "examples/simpo": [*fit("dpo", "examples/simpo"), *data(10, 4, 2, 128)],
    "examples/orpo": [*fit("dpo", "examples/orpo"), *data(10, 4, 2, 128)],
    "examples/kto": [*fit("dpo", "examples/kto"), *data(20, 8, 4, 128)],
    "examples/dpo_lora": [*fit("dpo", "examples/dpo_lora"), *data(10, 4, 2, 128)],
    "examples/kd_lora": [*fit("kd", "examples/kd_lora"), KD_CACHE, *data(10, 4, 2, 128)],
    # the capped data's targets fit the shipped budget whole: a smaller one keeps several chunks
    "examples/kd_chunked": [
        *fit("kd", "examples/kd_chunked"),
        KD_CACHE,
        "--data.init_args.cache_size_gb=0.00012",
        *data(10, 4, 2, 128),
    ],
    # its second teacher is the SFT demo's export (out/sft): a tiny saved model stands in
    "examples/kd_multi_teacher": [
        *fit("kd", "examples/kd_multi_teacher"),
        KD_CACHE,
        "--data.init_args.teachers="
        + json.dumps(
            [
                {"model": "distill/assets/teacher", "name": "demo-teacher"},
                {"model": TINY_TEACHER, "name": "sft-student"},
            ]
        ),
        *data(10, 4, 2, 128),
    ],
    # 6 prompts a round, 3 batches: steps 4 and 5 train on the second round
    "examples/kd_onpolicy_rounds": [
        *fit("kd", "examples/kd_onpolicy_rounds"),
        KD_CACHE,
        "--data.init_args.rounds.prompts_per_round=6",
        "--data.init_args.rounds.sampling.max_new_tokens=16",
        "--data.init_args.rounds.max_prompt_length=96",
        "--data.init_args.rounds.generation_batch_size=6",
        *data(10, 4, 2, 128),
    ],
}

SKIPPED = {
    "examples/sft_qlora": "4-bit bitsandbytes weights need a CUDA GPU",
    "examples/kd_qwen_7b_to_1.5b": "downloads Qwen2.5-7B-Instruct and Qwen2.5-1.5B from the hub",
    "prune": "the options of `python -m distill prune`, not a fit (tests/test_pipeline.py plans it)",
}


def figures(args: list[str], tmp: Path) -> dict[str, float | list[float]]:
    """Run ``python -m distill ARGS`` (``{tmp}`` replaced by ``tmp``) and return what it logged: the
    training losses of its steps and its validation loss, or for a collection its caches' statistics."""
    args = [arg.replace("{tmp}", str(tmp)) for arg in args]
    if str(tmp / "tiny-teacher") in " ".join(args):
        save_tiny_teacher(tmp / "tiny-teacher")
    env = clean_env(DISTILL_DATA_CACHE=str(tmp / "tokenized"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    run(args, env)
    if args[0] == "predict":
        out = {}
        for split in ("train", "val"):
            stats = json.loads(run(["cache", "stats", str(tmp / "cache" / split), "--json"], env).stdout)
            out[f"{split}/positions"] = float(stats["positions"])
            out[f"{split}/teacher_nll"] = stats["teachers"]["demo-teacher"]["teacher_nll_per_position"]
            out[f"{split}/kl_stored_vs_exact"] = stats["kl_stored_vs_exact"]
        return out
    train = losses_named(tmp / "logs", "train/loss")
    val = losses_named(tmp / "logs", "val/loss")
    assert sorted(train) == list(range(STEPS)) and sorted(val) == [STEPS - 1], (train, val)
    return {"train/loss": [train[step] for step in range(STEPS)], "val/loss": val[STEPS - 1]}


def differences(name: str, recorded: dict, now: dict) -> list[str]:
    """One line per figure of ``now`` that differs from ``recorded`` by more than ``TOLERANCE``."""
    lines = []
    for figure, want in recorded.items():
        pairs = zip(want, now[figure], strict=True) if isinstance(want, list) else [(want, now[figure])]
        for step, (a, b) in enumerate(pairs):
            if not math.isclose(a, b, rel_tol=TOLERANCE):
                at = f" at step {step}" if isinstance(want, list) else ""
                lines.append(f"{name}: {figure}{at}: recorded {a!r}, now {b!r}")
    return lines


def test_every_config_is_recorded_or_skipped():
    found = [*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/examples/*.yaml")]
    shipped = {path.relative_to(ROOT / "configs").with_suffix("").as_posix() for path in found}
    assert shipped == set(RUNS) | set(SKIPPED)
    assert set(json.loads(GOLDEN.read_text())) == set(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden(name, tmp_path):
    recorded = json.loads(GOLDEN.read_text())[name]
    assert recorded["args"] == RUNS[name], (
        f"{name}: its args changed since recording: regenerate (module docstring)"
    )
    mismatches = differences(name, recorded["figures"], figures(RUNS[name], tmp_path))
    assert not mismatches, "\n".join(mismatches)


def record(names: list[str]) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    for name in names or sorted(RUNS):
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            golden[name] = {"args": RUNS[name], "figures": figures(RUNS[name], Path(tmp))}
        print(f"{name} ({time.perf_counter() - began:.0f} s): {golden[name]['figures']}", flush=True)
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")


if __name__ == "__main__":
    record(sys.argv[1:])
