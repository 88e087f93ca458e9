"""The pipeline file: an ordered list of stages, each a fit config plus overrides (docs/pipeline.md, "The
file", has an example and the keys)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGE_KEYS = {"name", "kind", "config", "overrides", "model", "reference_model", "reward_model"}
KINDS = ("fit", "prune")
REFERENCE = re.compile(r"\$\{stages\.([A-Za-z0-9_-]+)\.(model|dir|export)\}")
NAME = re.compile(r"[A-Za-z0-9_-]+")


class PipelineError(ValueError):
    """A pipeline file or stage that cannot run; the message names the file and the stage."""


@dataclass(frozen=True)
class StageSpec:
    """One stage as the pipeline file writes it."""

    name: str
    config: tuple[str, ...]
    """Config files, composed left to right (paths as on the command line): a fit's, or ``prune``'s."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys and values, as ``--key value`` flags after the configs."""
    model: str = "auto"
    """``auto``: the output of the latest earlier stage that trained a causal LM (none for the first
    stage); ``keep``: the config's own model; else a path or a ``${stages.NAME.model}`` reference."""
    reference_model: str = "auto"
    """``auto``: the stage's starting model, where its objective has a reference; ``keep`` or a path."""
    reward_model: str = "auto"
    """``auto``: the latest earlier reward-model stage's output for every ``distill.rewards.ModelReward``."""
    kind: str = "fit"
    """``fit``: ``python -m distill fit``; ``prune``: ``python -m distill prune`` (docs/prune.md) of
    ``model``, its export the pruned model."""


@dataclass(frozen=True)
class PipelineSpec:
    path: Path
    output_dir: Path
    stages: tuple[StageSpec, ...]

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / name


def read_pipeline(path: str | Path) -> PipelineSpec:
    """Parse and check a pipeline file: unknown keys, duplicate names, missing configs and references to
    stages that do not come earlier are errors naming the file and the stage."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise PipelineError(f"pipeline {path}: cannot read it: {error}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise PipelineError(f"pipeline {path}: needs a non-empty list under 'stages'")
    unknown = set(raw) - {"output_dir", "stages"}
    if unknown:
        raise PipelineError(f"pipeline {path}: unknown keys {sorted(unknown)} (output_dir, stages)")
    stages: list[StageSpec] = []
    for index, entry in enumerate(raw["stages"], start=1):
        stage = _read_stage(path, index, entry)
        if any(s.name == stage.name for s in stages):
            raise PipelineError(f"pipeline {path}: two stages are named {stage.name!r}")
        for ref in references(stage):
            if ref not in {s.name for s in stages}:
                raise PipelineError(
                    f"pipeline {path}, stage {stage.name}: ${{stages.{ref}...}} names no earlier stage"
                )
        stages.append(stage)
    output_dir = Path(raw.get("output_dir") or f"runs/pipeline-{path.stem}")
    return PipelineSpec(path=path, output_dir=output_dir, stages=tuple(stages))


def _read_stage(path: Path, index: int, entry: Any) -> StageSpec:
    where = f"pipeline {path}, stage {index}"
    if not isinstance(entry, dict):
        raise PipelineError(f"{where}: a stage is a mapping with 'name' and 'config'")
    unknown = set(entry) - STAGE_KEYS
    if unknown:
        raise PipelineError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(STAGE_KEYS)})")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PipelineError(f"{where}: 'name' must be letters, digits, '-' or '_' (got {name!r})")
    where = f"pipeline {path}, stage {name}"
    configs = entry.get("config")
    configs = [configs] if isinstance(configs, str) else configs
    if not configs or not all(isinstance(c, str) for c in configs):
        raise PipelineError(f"{where}: 'config' must be a config file or a list of them")
    for config in configs:
        if not Path(config).is_file():
            raise PipelineError(f"{where}: config {config} does not exist")
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise PipelineError(f"{where}: 'overrides' must map dotted keys to values")
    chained = {key: entry.get(key, "auto") for key in ("model", "reference_model", "reward_model")}
    for key, value in chained.items():
        if not isinstance(value, str):
            raise PipelineError(f"{where}: '{key}' must be auto, keep or a path (got {value!r})")
    kind = entry.get("kind", "fit")
    if kind not in KINDS:
        raise PipelineError(f"{where}: 'kind' must be one of {', '.join(KINDS)} (got {kind!r})")
    if kind == "prune" and {chained["reference_model"], chained["reward_model"]} != {"auto"}:
        raise PipelineError(f"{where}: a prune stage has no reference_model or reward_model")
    return StageSpec(name=name, config=tuple(configs), overrides=dict(overrides), kind=kind, **chained)


def references(stage: StageSpec) -> set[str]:
    """Names of the stages that ``stage``'s values refer to."""
    found: set[str] = set()
    for value in (stage.model, stage.reference_model, stage.reward_model, *_strings(stage.overrides)):
        found.update(match.group(1) for match in REFERENCE.finditer(value))
    return found


def substitute(value: Any, outputs: dict[str, dict[str, str]]) -> Any:
    """``value`` with every ``${stages.NAME.FIELD}`` replaced from ``outputs[NAME][FIELD]``."""
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: outputs[m.group(1)][m.group(2)], value)
    if isinstance(value, dict):
        return {k: substitute(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, outputs) for v in value]
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
