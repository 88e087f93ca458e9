"""The Hugging Face export reproduces the trained model under every strategy, sharded ones included.

Each case fits a small pretrained student, then validates the export (merged first when it is a LoRA
adapter) in a new process: its validation loss must equal the one the trained model logged. Sharded
weights that were gathered wrongly, or an adapter saved from empty ZeRO-3 shards, cannot pass. The
DeepSpeed and ``configs/strategy/fsdp.yaml`` cases need a CUDA GPU (Lightning runs neither on a
CPU): on a GPU machine run ``python -m pytest tests/test_export_strategies.py``. FSDP also runs here
over two CPU processes through a test subclass of Lightning's strategy. Full-weight cases also match
the single-device run's validation loss (and, in one process, every step's training loss), which checks
that the loss is normalised alike under every strategy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import (
    ROOT,
    TINY_LLAMA,
    TOKENIZER_DIR,
    clean_env,
    conversation,
    losses_named,
    run,
    write_config,
    write_jsonl,
)

GPU = torch.cuda.is_available()
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
STEPS = 4
CASES = {  # name: (strategy config or None, LoRA, processes)
    "single": (None, False, 1),
    "single_lora": (None, True, 1),
    # FSDP over two CPU processes (FULL_SHARD), through a test subclass of Lightning's FSDPStrategy
    "fsdp_cpu": ("fsdp_cpu", False, 2),
    "fsdp_cpu_lora": ("fsdp_cpu", True, 2),
    "deepspeed_stage2": ("deepspeed_stage2", False, 1),
    "deepspeed_stage3": ("deepspeed_stage3", False, 1),
    "deepspeed_stage3_lora": ("deepspeed_stage3", True, 1),
    "fsdp_lora": ("fsdp", True, 1),
}
GPU_ONLY = {"deepspeed_stage2", "deepspeed_stage3", "fsdp"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Data and a small pretrained student (saved once; every case starts from these weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("export")
    write_jsonl(root / "train.jsonl", [conversation(i, turns=1 + i % 3) for i in range(32)])
    write_jsonl(root / "val.jsonl", [conversation(100 + i) for i in range(8)])
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    vocab = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(**TINY_LLAMA, **vocab)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return root


def run_config(workdir: Path, name: str, lora: bool, model: Path | None = None, processes: int = 1) -> Path:
    directory = workdir / name
    directory.mkdir(exist_ok=True)
    batch = 4 // processes  # the same samples per step whatever the ranks
    data = {"val_files": str(workdir / "val.jsonl"), "val_fraction": 0.0, "batch_size": batch}
    config = yaml.safe_load(write_config(directory, workdir / "train.jsonl", **data).read_text())
    config["seed_everything"] = 7
    config["precision"] = "32-true"  # exact comparisons across strategies
    config["trainer"].update(
        accelerator="gpu" if GPU else "cpu",
        devices=processes,
        max_steps=STEPS,
        val_check_interval=STEPS,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    student = config["model"]["init_args"]
    del student["model_config"], student["tokenizer"]  # the model directory's own (and its hparams path)
    student.update(model=str(model or workdir / "student"), lora=LORA if lora else None)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def single_device_losses(workdir) -> dict[int, float]:
    """The "single" case's run, the reference of the others' training losses."""
    config = run_config(workdir, "single", lora=False)
    run(["fit", "--config", str(config)], clean_env())
    return losses_named(workdir / "single", "train/loss")


@pytest.fixture(scope="module")
def single_device_val(workdir, single_device_losses) -> float:
    (val,) = losses_named(workdir / "single", "val/loss").values()
    return val


def strategy_args(workdir: Path, strategy: str | None) -> list[str]:
    if strategy is None:
        return []
    if strategy == "fsdp_cpu":  # configs/strategy/fsdp.yaml on CPU processes
        config = yaml.safe_load((ROOT / "configs" / "strategy" / "fsdp.yaml").read_text())
        config["trainer"]["accelerator"] = "cpu"
        config["trainer"]["strategy"]["class_path"] = "tests.probes.CPUFSDPStrategy"
        path = workdir / "fsdp_cpu.yaml"
        path.write_text(yaml.safe_dump(config))
        return ["--config", str(path)]
    return ["--config", str(ROOT / "configs" / "strategy" / f"{strategy}.yaml")]


@pytest.mark.parametrize("case", list(CASES))
def test_export_reproduces_the_trained_model(case, workdir, single_device_losses, single_device_val):
    strategy, lora, processes = CASES[case]
    if strategy in GPU_ONLY and not GPU:
        pytest.skip("DeepSpeed and FSDP run on CUDA GPUs only")
    if strategy and strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    if case != "single":  # the fixture ran that one
        config = run_config(workdir, case, lora, processes=processes)
        # devices after the strategy config, whose `auto` would mean one process on a CPU
        devices = ["--trainer.devices", str(processes)]
        run(["fit", "--config", str(config), *strategy_args(workdir, strategy), *devices], clean_env())
    trained = workdir / case / "hf"
    (trained_val,) = losses_named(workdir / case, "val/loss").values()

    if lora:
        from safetensors.torch import load_file

        adapter = load_file(trained / "adapter_model.safetensors")
        lora_b = [t for name, t in adapter.items() if "lora_B" in name]
        assert lora_b and all(t.numel() > 0 for t in adapter.values())  # no empty ZeRO-3 shard
        assert any(t.abs().max() > 0 for t in lora_b)  # B starts at 0: the trained values were saved
        run(["merge", "--adapter", str(trained), "--output", str(workdir / case / "merged")], clean_env())
        trained = workdir / case / "merged"

    check = run_config(workdir, f"{case}_check", lora=False, model=trained)
    run(["validate", "--config", str(check)], clean_env())
    (reloaded_val,) = losses_named(workdir / f"{case}_check", "val/loss").values()
    assert abs(reloaded_val - trained_val) < 1e-4 * max(1.0, trained_val), (trained_val, reloaded_val)

    if not lora:  # trained alike: the same validation loss, and per step (logged by rank 0 alone)
        want_val = single_device_val
        assert abs(trained_val - want_val) < 1e-4 * want_val, (want_val, trained_val)
        losses = losses_named(workdir / case, "train/loss")
        assert sorted(losses) == list(range(STEPS))
        for step, want in single_device_losses.items():
            if processes == 1:
                assert abs(losses[step] - want) < 1e-4 * max(1.0, want), (step, want, losses[step])
