"""The real CLI, end to end, on a two-layer model: fit with overrides, HF export, configs, print_config."""

import json
import re
import traceback
from pathlib import Path

import pytest
import torch
import yaml

from distill.cli import resolve_precision, run_cli
from distill.commands import main
from tests.helpers import ROOT, clean_env, logged_rows, run, with_last_checkpoint, write_config


def test_fit_end_to_end_with_overrides(tmp_path, chat_file):
    config = write_config(tmp_path, chat_file)
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            "12",
            "--data.init_args.max_seq_length",
            "96",
            "--trainer.val_check_interval",
            "6",
            "--trainer.check_val_every_n_epoch",
            "null",
        ]
    )
    rows = logged_rows(tmp_path)
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(train) == 12  # the step override took effect, logged every step
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3  # it learns
    val = [r for r in rows if r.get("val/loss")]
    assert len(val) == 2 and float(val[0]["val/ppl"]) == pytest.approx(
        torch.tensor(float(val[0]["val/loss"])).exp().item(), rel=1e-4
    )
    assert any(r.get("data/train_trainable_share") for r in rows)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tmp_path / "hf"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert AutoTokenizer.from_pretrained(export).chat_template  # the template it was trained with
    saved = yaml.safe_load((export / "distill_config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 12 and saved["data"]["init_args"]["max_seq_length"] == 96
    # the export equals the trained weights: same logits as a fresh load of the module's checkpoint
    ids = torch.tensor([[1, 415, 2936, 9060]])
    assert model.config.num_hidden_layers == 2 and torch.isfinite(model(ids).logits).all()


def test_export_round_trip_matches_the_trained_module(tmp_path, chat_file):
    config = write_config(tmp_path, chat_file)
    cli = run_cli(["fit", "--config", str(config), "--trainer.max_steps", "3"])
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    trained = cli.model.model.eval()
    ids = torch.tensor([[1, 415, 2936, 9060, 28723]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits)


def test_print_config_and_composed_configs(tmp_path, chat_file, capsys):
    config = write_config(tmp_path, chat_file)
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    lora: {r: 4, alpha: 8}\n")
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(config),
                "--config",
                str(override),
                "--model.init_args.lora.r",
                "8",
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (
        printed["model"]["init_args"]["lora"]["r"] == 8
        and printed["model"]["init_args"]["lora"]["alpha"] == 8
    )
    assert "tokenizer" not in printed["data"]["init_args"]  # derived from the model's, not set twice


@pytest.mark.parametrize(
    ("schedule", "check"),
    [
        (
            {
                "class_path": "distill.train.schedule.WarmupDecay",
                "init_args": {"decay": "linear", "warmup_ratio": 0.25},
            },
            lambda scheduler, lrs: lrs[:4] == pytest.approx([0.0, 0.005, 0.01, 0.01 * 5 / 6]),
        ),
        (  # a torch scheduler whose second argument is the run's steps
            {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"eta_min": 0.001}},
            lambda scheduler, lrs: scheduler.T_max == 8 and scheduler.eta_min == 0.001 and lrs[0] == 0.01,
        ),
    ],
    ids=["WarmupDecay", "CosineAnnealingLR"],
)
def test_the_schedule_is_a_class_path_given_the_optimizer_and_the_run_steps(
    tmp_path, chat_file, schedule, check
):
    config = write_config(tmp_path, chat_file)
    cli = run_cli(
        [
            "--config",
            str(config),
            "--trainer.max_steps",
            "8",
            f"--model.init_args.scheduler={json.dumps(schedule)}",
        ],
        run=False,
    )
    cli.model.trainer = cli.trainer
    cli.model.configure_model()
    configured = cli.model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert type(scheduler).__name__ == schedule["class_path"].rsplit(".", 1)[1] and check(scheduler, lrs), lrs


def base_configs(path: Path) -> list[str]:
    """Full configs stand alone; override files compose onto the demo they extend."""
    if "class_path" in (yaml.safe_load(path.read_text()).get("model") or {}):
        return []
    preference = ("ipo.yaml", "simpo.yaml", "orpo.yaml", "kto.yaml", "dpo_lora.yaml")
    demo = "kd.yaml" if path.name.startswith("kd") else "dpo.yaml" if path.name in preference else "sft.yaml"
    return ["--config", str(ROOT / "configs" / demo)]


# the configs tests/test_golden.py replays (instantiated and trained there) are not instantiated again
REPLAYED = set(json.loads((ROOT / "tests" / "golden_losses.json").read_text()))
FIT_CONFIGS = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if p.parent.name != "pipelines"
    and p.name != "prune.yaml"  # `prune`'s options, planned as a stage by tests/test_pipeline.py
    and str(p.relative_to(ROOT / "configs").with_suffix("")) not in REPLAYED
)


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: p.name)  # pipelines: tests/test_pipeline.py
def test_every_config_parses_and_instantiates(path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    args = [*base_configs(path), "--config", str(path)]
    # hub models (no download here) and GPU strategies (no GPU here): parse and resolve only
    if "Qwen/" in path.read_text() or path.parent.name == "strategy":
        with pytest.raises(SystemExit) as exit_info:
            run_cli(["fit", *args, "--print_config"])
        assert exit_info.value.code in (0, None)
        # deepspeed logs its accelerator detection to stdout on import
        printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[20")]
        resolved = yaml.safe_load("\n".join(printed))
        assert resolved["model"]["init_args"]["tokenizer"]
        if path.parent.name == "strategy":
            check_strategy_instantiates(path.stem, resolved["trainer"]["strategy"])
        return
    cli = run_cli(args, run=False)
    assert cli.model is not None and cli.trainer is not None
    # the data module's tokenizer is linked from the model's
    assert cli.datamodule.tokenizer_name == cli.model.tokenizer_id


def check_strategy_instantiates(name: str, config: dict) -> None:
    """Build the strategy object exactly as LightningCLI would (no GPU needed until setup)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config})).strategy
    if name.startswith("deepspeed"):
        assert isinstance(strategy, DeepSpeedStrategy)
        assert strategy.config["zero_optimization"]["stage"] == int(name[-1])
        # our loaders yield ready batches (no batch sampler), so DeepSpeed cannot infer this itself
        assert strategy.config["train_micro_batch_size_per_gpu"] == 1
    elif name == "fsdp":
        assert isinstance(strategy, FSDPStrategy)
        assert strategy._state_dict_type == "full" and strategy.kwargs["use_orig_params"]
        layers = strategy.kwargs["auto_wrap_policy"]._module_classes
        assert any(cls.__name__ == "LlamaDecoderLayer" for cls in layers)
    else:
        assert type(strategy) is DDPStrategy


def test_auto_precision_on_cpu():
    if not torch.cuda.is_available():
        assert resolve_precision("auto") == "32-true"
    assert resolve_precision("bf16-mixed") == "bf16-mixed"


def test_unknown_template_fails_before_training(tmp_path, chat_file):
    config = write_config(tmp_path, chat_file, template="vicuna")
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        main(["fit", "--config", str(config)])


def test_inspect_shows_masked_positions(tmp_path, chat_file, capsys):
    config = write_config(tmp_path, chat_file)
    main(["inspect", "--config", str(config), "--num_samples", "1"])
    out = capsys.readouterr().out
    assert "template: mistral" in out and "[<s>[INST] You answer briefly." in out
    assert "It is 0, since 0 plus 0 is 0.</s>" in out and "trainable" in out


STAGES = {
    "dpo.yaml": ("distill.PreferenceDataModule", "distill.objectives.Preference"),
    "rm.yaml": ("distill.PreferenceDataModule", "distill.objectives.RewardModel"),
    "grpo.yaml": ("distill.PromptDataModule", "distill.objectives.GRPO"),
    "rloo.yaml": ("distill.PromptDataModule", "distill.objectives.RLOO"),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize(
    "strategy",
    [*sorted((ROOT / "configs" / "strategy").glob("*.yaml")), ROOT / "configs" / "overrides" / "lora.yaml"],
    ids=lambda p: p.stem,
)
def test_stage_configs_compose_with_the_strategy_and_lora_configs(stage, strategy, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", f"configs/{stage}", "--config", str(strategy), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[20")]
    resolved = yaml.safe_load("\n".join(printed))
    data, objective = STAGES[stage]
    composed = (
        resolved["model"]["init_args"]["lora"] if strategy.stem == "lora" else resolved["trainer"]["strategy"]
    )
    assert composed and resolved["data"]["class_path"] == data
    assert resolved["model"]["init_args"]["objective"]["class_path"] == objective


def test_ckpt_path_last_needs_a_last_checkpoint(tmp_path, chat_file, capfd):
    """Lightning's ``last`` trains from step 0 after a warning when there is none: a resubmitted job would
    redo a killed run's steps. ``last`` is an error naming where it looked; ``last_if_any`` is Lightning's."""
    config = yaml.safe_load(write_config(tmp_path, chat_file).read_text())
    config["trainer"]["enable_checkpointing"] = True
    path = with_last_checkpoint(config, tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(path), "--trainer.max_steps", "1", "--ckpt_path", "last"])
    assert stop.value.code == 2
    err = capfd.readouterr().err.splitlines()
    assert err[-1] == (
        f"error: --ckpt_path last: no last checkpoint (last*.ckpt) in {tmp_path / 'checkpoints'}. Give a "
        "checkpoint's path, or --ckpt_path last_if_any to start from scratch when there is none"
    )
    assert not (tmp_path / "logs").exists()  # nothing trained


def test_ckpt_path_resume_point(tmp_path):
    from lightning.pytorch import Trainer

    from distill.cli import ConfigError, resume_point

    def trainer(**options):
        return Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, **options)

    with pytest.raises(ConfigError, match="the run has no ModelCheckpoint"):
        resume_point(trainer(enable_checkpointing=False), "last")
    # Lightning's default ModelCheckpoint, without a logger: under default_root_dir
    with pytest.raises(ConfigError, match=re.escape(f"in {tmp_path / 'checkpoints'}. ")):
        resume_point(trainer(), "last")
    assert resume_point(trainer(), "last_if_any") == "last"  # Lightning's: the newest if any, else none
    assert resume_point(trainer(), "some.ckpt") == "some.ckpt"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    assert resume_point(trainer(), "last") == "last"


def test_a_fit_prints_nothing_a_user_cannot_act_on(tmp_path, chat_file):
    """Lightning's cloud tip, torch's LeafSpec deprecation (Lightning's code), the IterableDataset
    ``__len__`` note (distill deals batches to workers) and a model summary of "0" FLOPs (Lightning counts
    only an ``example_input_array``'s) said nothing useful; the summary itself stays."""
    config = write_config(tmp_path, chat_file)
    result = run(["fit", "--config", str(config), "--trainer.max_steps", "1"], clean_env())
    out = result.stdout + result.stderr
    assert "Trainable params" in out and "LlamaForCausalLM" in out
    for noise in ("litlogger", "LeafSpec", "IterableDataset", "FLOPs", "Flops", "Tip"):
        assert noise not in out, out


@pytest.mark.parametrize(
    ("config", "objective", "wanted"),
    [
        (
            "sft.yaml",
            "distill.objectives.Preference",
            "Preference trains on pairs batches, but DataModule yields samples",
        ),
        (
            "sft.yaml",
            "distill.objectives.Distillation",
            "Distillation reads cached teacher targets, but DataModule",
        ),
        (
            "dpo.yaml",
            "distill.objectives.KTO",
            "KTO trains on unpaired batches, but PreferenceDataModule yields pairs",
        ),
    ],
    ids=["pairs", "targets", "unpaired"],
)
def test_an_objective_paired_with_data_it_cannot_train_on_is_refused_before_the_model_trains(
    config, objective, wanted, monkeypatch
):
    monkeypatch.chdir(ROOT)
    args = ["fit", "--config", f"configs/{config}", "--model.init_args.objective", objective]
    args += [
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "false",
    ]
    args += ["--data.init_args.max_train_samples", "4", "--data.init_args.max_eval_samples", "2"]
    with pytest.raises(ValueError, match=wanted) as refused:
        run_cli(args)
    assert "configure_model" in "".join(traceback.format_tb(refused.tb))  # at setup, not in a step
