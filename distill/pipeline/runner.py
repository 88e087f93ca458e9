"""``python -m distill pipeline --config configs/pipelines/NAME.yaml``: run the stages in order, each as
its own ``python -m distill fit`` process, merging a LoRA stage's adapter before the next stage loads it.

A stage directory holds ``config.yaml`` (what ran), ``stage.json`` (its key, written before the fit),
``model/`` (the export), ``merged/`` (LoRA stages), ``checkpoints/``, ``logs/`` (TensorBoard),
``train_results.json``, ``eval_results.json``, ``trainer_state.json``, and ``complete.json``, written
last. A stage's key hashes its resolved config, the content of its data files and the completion of the
stage before it, so a changed config or data file reruns that stage and every later one. Under ``srun``
or ``torchrun`` every rank runs the pipeline: each rank's fit joins the others' as a single run would,
and only rank 0 writes the stage files, merges and marks completion, which the other ranks wait for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from distill.pipeline.inputs import ContentHashes, data_digest
from distill.pipeline.plan import Stage, plan
from distill.pipeline.spec import PipelineError, read_pipeline

POLL_SECONDS = 1.0


def global_rank() -> int:
    """This process's rank under torchrun (``RANK``) or srun (``SLURM_PROCID``); 0 when alone."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def stage_key(stage: Stage, upstream: str | None, data: str) -> str:
    """What ``complete.json`` must hold for ``stage`` to count as done: its config, its data's digest and
    the run of the stage it loads from."""
    return hashlib.sha256(f"{stage.digest}:{data}:{upstream or ''}".encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def completion(stage: Stage, key: str) -> dict[str, Any] | None:
    """The stage's completion marker if it matches ``key`` and its model is in place."""
    marker = read_json(stage.dir / "complete.json")
    if marker is None or marker.get("key") != key or not stage.model.is_dir():
        return None
    return marker


class Runner:
    def __init__(
        self, stages: list[Stage], selected: set[str], hashes: ContentHashes, force: bool = False
    ) -> None:
        self.stages = stages
        self.selected = selected
        self.hashes = hashes
        self.force = force
        self.rank = global_rank()

    def key(self, stage: Stage, upstream: str | None) -> str:
        key = stage_key(stage, upstream, data_digest(stage.config, self.hashes))
        if self.rank == 0:
            self.hashes.save()
        return key

    def run(self) -> None:
        upstream: str | None = None  # the run id of the previous stage's completion
        for index, stage in enumerate(self.stages):
            key = self.key(stage, upstream)
            marker = completion(stage, key)
            if stage.name in self.selected and (marker is None or self.force):
                marker = self.run_stage(stage, key, fresh=marker is not None)
            elif marker is not None:
                log(f"{stage.name}: complete ({stage.model}), skipped")
            else:
                later = [s.name for s in self.stages[index + 1 :] if s.name in self.selected]
                if later:
                    raise PipelineError(
                        f"stage {later[0]} needs stage {stage.name}, which is not complete or is stale (its "
                        f"config or data changed since it ran): add {stage.name} to --stages"
                    )
            upstream = marker["run_id"] if marker else None

    def run_stage(self, stage: Stage, key: str, fresh: bool) -> dict[str, Any]:
        if self.rank == 0:
            started = self.prepare(stage, key, fresh)
        else:
            started = wait_for(stage.dir / "stage.json", key, stage, launch=launch_id())
        command = fit_command(stage, started.get("resume_from"))
        log(f"{stage.name}: {' '.join(command)}")
        result = subprocess.run(command, env=stage_env(self.stages.index(stage)))
        if result.returncode != 0:
            message = f"stage {stage.name} failed (exit {result.returncode})"
            if self.rank == 0:
                write_json(stage.dir / "failed.json", {"key": key, "error": message})
            raise PipelineError(f"{message}; rerun the pipeline to resume it from {stage.checkpoint}")
        if self.rank != 0:
            return wait_for(stage.dir / "complete.json", key, stage)
        if stage.lora:
            merge(stage)
        marker = {"key": key, "run_id": uuid.uuid4().hex, "model": str(stage.model), "finished": now()}
        write_json(stage.dir / "complete.json", marker)
        log(f"{stage.name}: complete -> {stage.model}")
        return marker

    def prepare(self, stage: Stage, key: str, fresh: bool) -> dict[str, Any]:
        """Clear a stage left by another config (or all of it: ``fresh``), keep a killed run's checkpoint,
        write what will run."""
        previous = read_json(stage.dir / "stage.json")
        if stage.dir.exists() and (fresh or (previous or {}).get("key") != key):
            why = "rerun by --force" if fresh else "its config or inputs changed since its last run"
            log(f"{stage.name}: {why}: starting it afresh, its previous outputs removed")
            shutil.rmtree(stage.dir)
        for stale in ("complete.json", "failed.json"):
            (stage.dir / stale).unlink(missing_ok=True)
        resume = str(stage.checkpoint) if stage.checkpoint.exists() else None
        if resume:
            log(f"{stage.name}: resuming from {resume}")
        stage.dir.mkdir(parents=True, exist_ok=True)
        (stage.dir / "config.yaml").write_text(yaml.safe_dump(stage.config, sort_keys=False))
        started = {"key": key, "launch": launch_id(), "resume_from": resume, "started": now()}
        write_json(stage.dir / "stage.json", started)
        return started


def fit_command(stage: Stage, resume_from: str | None) -> list[str]:
    command = [sys.executable, "-m", "distill", "fit", "--config", str(stage.dir / "config.yaml")]
    return command + (["--ckpt_path", resume_from] if resume_from else [])


def stage_env(index: int) -> dict[str, str]:
    """The environment of stage ``index``'s fit: the launcher's, so its ranks join one fit. torchrun's
    agent store outlives a stage and would hand the next stage's ranks the last one's addresses: each
    stage's rank 0 hosts its own store instead, on a port of its own (the same on every rank)."""
    env = dict(os.environ)
    if env.pop("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true" and "MASTER_PORT" in env:
        env["MASTER_PORT"] = str(int(env["MASTER_PORT"]) + 1 + index)
    return env


def merge(stage: Stage) -> None:
    """Fold the stage's adapter into its base, in its own process (as the fit, its memory freed after)."""
    command = [sys.executable, "-m", "distill", "merge", "--adapter", str(stage.export), "--output"]
    command.append(str(stage.merged))
    shutil.rmtree(stage.merged, ignore_errors=True)
    if subprocess.run(command).returncode != 0:
        raise PipelineError(f"stage {stage.name}: merging {stage.export} failed (the error is above)")


def launch_id() -> str:
    """The same on every rank of one launch, another in the next: a rank waiting for rank 0 ignores what
    an earlier, killed launch left."""
    names = (
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
        "SLURM_JOB_ID",
        "SLURM_STEP_ID",
        "MASTER_PORT",
    )
    return ".".join(os.environ.get(name, "") for name in names)


def wait_for(path: Path, key: str, stage: Stage, launch: str | None = None) -> dict[str, Any]:
    """Rank 0's marker ``path`` once it holds ``key`` (and ``launch``); rank 0's failure is raised."""
    while True:
        marker = read_json(path)
        if marker is not None and marker.get("key") == key and launch in (None, marker.get("launch")):
            return marker
        failed = read_json(stage.dir / "failed.json")
        if failed is not None and failed.get("key") == key:
            raise PipelineError(f"rank 0: {failed['error']}")
        time.sleep(POLL_SECONDS)


def write_json(path: Path, values: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(values, indent=2) + "\n")
    partial.replace(path)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def log(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def describe(stages: list[Stage], selected: set[str], hashes: ContentHashes) -> str:
    """The plan ``--dry_run`` prints: each stage's status, inputs, outputs and command."""
    lines, upstream = [], None
    for index, stage in enumerate(stages, start=1):
        key = stage_key(stage, upstream, data_digest(stage.config, hashes))
        marker = completion(stage, key)
        upstream = marker["run_id"] if marker else None
        if marker:
            status = "complete, skipped"
        elif stage.name not in selected:
            status = "not selected"
        elif stage.checkpoint.exists() and (read_json(stage.dir / "stage.json") or {}).get("key") == key:
            status = f"resumes from {stage.checkpoint}"
        else:
            status = "runs"
        lines.append(f"{index}. {stage.name}: {status}")
        lines.append(f"   config: {', '.join(stage.spec.config)}")
        for name, value in stage.inputs.items():
            lines.append(f"   {name}: {value}")
        lines.append(
            f"   output: {stage.model}" + (f" (adapter {stage.export}, merged)" if stage.lora else "")
        )
        lines.append(f"   run: python {' '.join(fit_command(stage, None)[1:])}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the pipeline file (configs/pipelines/*.yaml)")
    parser.add_argument("--stages", default=None, help="comma-separated stage names to run (default: all)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages even if complete")
    args = parser.parse_args(argv)
    try:
        pipeline = read_pipeline(args.config)
        names = [s.name for s in pipeline.stages]
        selected = set(args.stages.split(",")) if args.stages else set(names)
        if selected - set(names):
            raise PipelineError(
                f"--stages: no stage {sorted(selected - set(names))} in {args.config} ({names})"
            )
        stages = plan(pipeline)
        hashes = ContentHashes(Path(pipeline.output_dir) / "data_hashes.json")
        if args.dry_run:
            print(f"pipeline {args.config} -> {pipeline.output_dir}\n{describe(stages, selected, hashes)}")
            return
        Runner(stages, selected, hashes, force=args.force).run()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    log(f"done: {pipeline.output_dir}")
