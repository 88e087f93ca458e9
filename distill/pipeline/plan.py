"""Each stage's fit config, resolved as ``python -m distill fit --print_config`` resolves it, then pointed
at the stage's directory and at the models earlier stages produce (a prune stage: ``prune``'s options)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.pipeline.spec import PipelineError, PipelineSpec, StageSpec, substitute

HF_EXPORT = "distill.callbacks.HFExport"
STAGE_RESULTS = "distill.callbacks.StageResults"
MODEL_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
FILE_LOGGERS = {"lightning.pytorch.loggers.CSVLogger", TENSORBOARD}
MODEL_REWARD = "distill.rewards.ModelReward"
REFERENCE = "distill.objectives.Reference"
REWARD_OBJECTIVE = "distill.objectives.RewardModel"
# the override keys that set what ``auto`` would chain
OVERRIDDEN = {
    "model": "model.init_args.model",
    "reference_model": "model.init_args.objective.init_args.reference.init_args.model",
    "rewards": "model.init_args.objective.init_args.rewards",
}


@dataclass
class Stage:
    """A stage ready to run: its directory, its resolved config, and what it took from earlier stages."""

    spec: StageSpec
    dir: Path
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def export(self) -> Path:
        """HFExport's directory: the model, or the LoRA adapter."""
        return self.dir / "model"

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    @property
    def prunes(self) -> bool:
        return self.spec.kind == "prune"

    @property
    def lora(self) -> bool:
        return not self.prunes and self.config["model"]["init_args"].get("lora") is not None

    @property
    def model(self) -> Path:
        """What later stages load: the merged model when the stage trained an adapter."""
        return self.merged if self.lora else self.export

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "last.ckpt"

    @property
    def trains_reward_model(self) -> bool:
        return not self.prunes and objective(self.config).get("class_path") == REWARD_OBJECTIVE

    @property
    def digest(self) -> str:
        """sha256 of the resolved config: what a completed stage's marker is checked against."""
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()


def plan(pipeline: PipelineSpec) -> list[Stage]:
    """Every stage of ``pipeline``, in order, with its config resolved and chained."""
    stages: list[Stage] = []
    outputs: dict[str, dict[str, str]] = {}
    for spec in pipeline.stages:
        stage_dir = pipeline.stage_dir(spec.name)
        overrides = substitute(spec.overrides, outputs)
        where = f"pipeline {pipeline.path}, stage {spec.name}"
        if spec.kind == "prune":
            stage = Stage(
                spec=spec, dir=stage_dir, config=resolve_prune_config(spec.config, overrides, where)
            )
            chain_pruned_model(stage, stages, outputs, where)
        else:
            stage = Stage(spec=spec, dir=stage_dir, config=resolve_config(spec.config, overrides, where))
            point_at_stage_dir(stage.config, stage)
            chain_models(stage, stages, outputs)
        stages.append(stage)
        outputs[spec.name] = {"model": str(stage.model), "dir": str(stage.dir), "export": str(stage.export)}
    return stages


def resolve_config(files: tuple[str, ...], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """The full config ``fit`` would run with: every default filled in, every ``--config`` composed."""
    from distill.cli import run_cli

    args = ["fit"] + [arg for file in files for arg in ("--config", file)]
    args += [f"--{key}={v if isinstance(v, str) else json.dumps(v)}" for key, v in overrides.items()]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run_cli([*args, "--print_config"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise PipelineError(f"{where}: its config does not parse (the error is printed above)") from None
    return yaml.safe_load(printed.getvalue())


def resolve_prune_config(files: tuple[str, ...], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """``python -m distill prune``'s options from the stage's files and overrides, every default filled
    in (the calibration data too: its files count in the stage's key)."""
    from distill.commands.prune import parser
    from distill.prune.run import DEMO_DATA

    prune = parser()
    args = ["--model=", "--output="] + [arg for file in files for arg in ("--config", file)]
    args += [f"--{key}={v if isinstance(v, str) else json.dumps(v)}" for key, v in overrides.items()]
    try:
        config = yaml.safe_load(prune.dump(prune.parse_args(args)))
    except SystemExit:
        raise PipelineError(
            f"{where}: its prune config does not parse (the error is printed above)"
        ) from None
    config["data"] = config.get("data") or DEMO_DATA
    return config


def chain_pruned_model(
    stage: Stage, earlier: list[Stage], outputs: dict[str, dict[str, str]], where: str
) -> None:
    """A prune stage's model: ``auto``, the latest earlier causal LM stage's output, else the config's."""
    policies = [s for s in earlier if not s.trains_reward_model]
    auto = str(policies[-1].model) if policies and "model" not in stage.spec.overrides else None
    model = _choice(stage.spec.model, auto, outputs)
    if model is not None:
        stage.config["model"] = model
    if not stage.config["model"]:
        raise PipelineError(
            f"{where}: no model to prune: give the stage 'model: PATH' (or ${{stages.NAME.model}}), or "
            "'model:' in its config"
        )
    stage.inputs["model"] = stage.config["model"]
    stage.config["output"] = str(stage.export)


def point_at_stage_dir(config: dict[str, Any], stage: Stage) -> None:
    """Logs, checkpoints, the export and the results files all under the stage's directory."""
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(stage.dir)
    loggers = trainer.get("logger")
    loggers = [] if loggers in (None, True, False) else loggers if isinstance(loggers, list) else [loggers]
    loggers = [logger for logger in loggers if logger.get("class_path") not in FILE_LOGGERS]
    tensorboard = {"save_dir": str(stage.dir / "logs"), "name": "", "version": "", "default_hp_metric": False}
    trainer["logger"] = [*loggers, {"class_path": TENSORBOARD, "init_args": tensorboard}]
    callbacks = [c if isinstance(c, dict) else {"class_path": c} for c in trainer.get("callbacks") or []]
    export = _pop(callbacks, HF_EXPORT) or {}
    checkpoint = _pop(callbacks, MODEL_CHECKPOINT)
    _pop(callbacks, STAGE_RESULTS)
    if checkpoint is None:  # a stage must resume after a kill: periodic last.ckpt
        interval = trainer.get("val_check_interval")
        checkpoint = {"save_top_k": 0, "every_n_train_steps": interval if isinstance(interval, int) else 100}
    checkpoint.update(dirpath=str(stage.dir / "checkpoints"), save_last=True)
    trainer["callbacks"] = [
        *callbacks,
        {"class_path": HF_EXPORT, "init_args": {**export, "dirpath": str(stage.export)}},
        {"class_path": MODEL_CHECKPOINT, "init_args": checkpoint},
        {"class_path": STAGE_RESULTS, "init_args": {"dirpath": str(stage.dir)}},
    ]
    trainer["enable_checkpointing"] = True
    config["validate_after_fit"] = True


def chain_models(stage: Stage, earlier: list[Stage], outputs: dict[str, dict[str, str]]) -> None:
    """Point the stage's model, reference and reward models at earlier stages' outputs (``auto``) or at
    the pipeline file's paths, and record each in ``stage.inputs``. A value the stage's overrides set
    is the stage's own choice: ``auto`` leaves it alone."""
    spec, model_args = stage.spec, stage.config["model"]["init_args"]
    policies = [s for s in earlier if not s.trains_reward_model]
    auto = str(policies[-1].model) if policies and OVERRIDDEN["model"] not in spec.overrides else None
    model = _choice(spec.model, auto, outputs)
    if model is not None:
        model_args.update(model=model, model_config=None, tokenizer=None)
        stage.inputs["model"] = model
    goal = objective(stage.config).get("init_args") or {}
    if "reference" in goal:  # the objective has a reference (null: the default one)
        options = (goal["reference"] or {}).get("init_args") or {}
        given = options.get("model")
        fallback = None if model is not None else given  # None: the starting model
        if OVERRIDDEN["reference_model"] in spec.overrides:
            fallback = given
        reference = _choice(spec.reference_model, fallback, outputs, keep=given)
        goal["reference"] = {"class_path": REFERENCE, "init_args": {**options, "model": reference}}
        if reference is not None:
            stage.inputs["reference_model"] = reference
    judges = [s for s in earlier if s.trains_reward_model and OVERRIDDEN["rewards"] not in spec.overrides]
    for reward in goal.get("rewards") or []:
        if isinstance(reward, dict) and reward.get("class_path") == MODEL_REWARD:
            args = reward.setdefault("init_args", {})
            path = _choice(spec.reward_model, str(judges[-1].model) if judges else None, outputs)
            if path is not None:
                args["path"] = path
                stage.inputs["reward_model"] = path


def objective(config: dict[str, Any]) -> dict[str, Any]:
    return config["model"]["init_args"].get("objective") or {}


def _choice(
    value: str, auto: str | None, outputs: dict[str, dict[str, str]], keep: str | None = None
) -> str | None:
    """What a stage's ``model``-like key selects: None leaves the config's value alone."""
    if value == "auto":
        return auto
    if value == "keep":
        return keep
    return substitute(value, outputs)


def _pop(callbacks: list[dict[str, Any]], class_path: str) -> dict[str, Any] | None:
    """Remove the callbacks of ``class_path``; the init args of the first, if there was one."""
    found = [c for c in callbacks if c.get("class_path") == class_path]
    callbacks[:] = [c for c in callbacks if c.get("class_path") != class_path]
    return dict(found[0].get("init_args") or {}) if found else None
