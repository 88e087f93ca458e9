"""Running a planned pipeline (the ``pipeline`` command): the stages in order, each as its own
``python -m distill fit`` process, a LoRA stage's adapter merged before the next stage loads it.
docs/pipeline.md has the stage directory's files, the stage key, the ranks' roles and the lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from distill.cache.lock import WriterLock
from distill.pipeline.inputs import ContentHashes, data_digest
from distill.pipeline.plan import Stage
from distill.pipeline.spec import PipelineError

POLL_SECONDS = 1.0
STAGE_MARKER = "stage.json"  # in every stage directory the pipeline made, and only there
PR_SET_PDEATHSIG = 1  # linux/prctl.h
FORWARDED = (signal.SIGTERM, signal.SIGINT)
# environment variables that tell one launch from the next (launch_id)
LAUNCH = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_STEP_ID", "MASTER_PORT")


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
        # every stage directory is under the pipeline's output directory
        with pipeline_lock(self.stages[0].dir.parent, self.rank):
            self._run()

    def _run(self) -> None:
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
        """Run the stage on this rank; whatever fails here (the fit, ``prepare``, the merge, a marker) is
        marked for the other ranks of this launch, which end with this rank's message."""
        refused = foreign(stage)  # every rank sees it: no marker can go into a directory not ours
        if refused:
            raise PipelineError(refused)
        launch = launch_id()
        try:
            return self._run_stage(stage, key, fresh, launch)
        except OtherRankFailed:
            raise
        except BaseException as error:
            message = str(error) if isinstance(error, PipelineError) else f"{type(error).__name__}: {error}"
            mark_failure(stage, key, launch, self.rank, message)
            raise

    def _run_stage(self, stage: Stage, key: str, fresh: bool, launch: str) -> dict[str, Any]:
        def elsewhere() -> str | None:
            return failure_elsewhere(stage, key, launch, self.rank)

        if self.rank == 0:
            started = self.prepare(stage, key, fresh, launch)
        else:
            started = wait_for(stage.dir / STAGE_MARKER, key, elsewhere, launch=launch)
        if stage.prunes and self.rank != 0:  # one process prunes; the next stage's ranks load its model
            return wait_for(stage.dir / "complete.json", key, elsewhere)
        command = stage_command(stage, started.get("resume_from"))
        log(f"{stage.name}: {' '.join(command)}")
        code = run_child(command, env=stage_env(self.stages.index(stage)), stop_when=elsewhere)
        if code != 0:
            where = "" if self.rank == 0 else f" on rank {self.rank}"
            raise PipelineError(
                f"stage {stage.name} failed{where} (exit {code}); rerun the pipeline to resume it from "
                f"{stage.checkpoint}"
            )
        if self.rank != 0:
            return wait_for(stage.dir / "complete.json", key, elsewhere)
        if stage.lora:
            merge(stage)
        marker = {"key": key, "run_id": uuid.uuid4().hex, "model": str(stage.model), "finished": now()}
        write_json(stage.dir / "complete.json", marker)
        log(f"{stage.name}: complete -> {stage.model}")
        return marker

    def prepare(self, stage: Stage, key: str, fresh: bool, launch: str) -> dict[str, Any]:
        """Clear a stage left by another config (or all of it: ``fresh``), keep a killed run's checkpoint,
        write what will run."""
        previous = read_json(stage.dir / STAGE_MARKER)
        if stage.dir.exists() and (fresh or (previous or {}).get("key") != key):
            why = "rerun by --force" if fresh else "its config or inputs changed since its last run"
            log(f"{stage.name}: {why}: starting it afresh, its previous outputs removed")
            remove_stage_dir(stage)
        for stale in [stage.dir / "complete.json", *stage.dir.glob("failed*.json")]:
            stale.unlink(missing_ok=True)
        if stage.prunes:  # what a killed prune wrote: prune refuses a directory not empty
            shutil.rmtree(stage.export, ignore_errors=True)
        resume = str(stage.checkpoint) if stage.checkpoint.exists() else None
        if resume:
            log(f"{stage.name}: resuming from {resume}")
        stage.dir.mkdir(parents=True, exist_ok=True)
        started = {"key": key, "launch": launch, "resume_from": resume, "started": now()}
        write_json(stage.dir / STAGE_MARKER, started)  # first: the directory is the pipeline's from now on
        (stage.dir / "config.yaml").write_text(yaml.safe_dump(stage.config, sort_keys=False))
        return started


class OtherRankFailed(PipelineError):
    """Another rank of this launch marked a failure: this rank ends with its message."""


def foreign(stage: Stage) -> str | None:
    """Why the stage's directory may not be used or removed: it exists and holds something, but not the
    marker of a directory the pipeline made; None when it is the pipeline's, empty or absent."""
    directory = stage.dir
    if not directory.exists() and not directory.is_symlink():
        return None
    # ours: marked, or empty but for the failure markers of a stage that failed before its stage.json
    marked = (directory / STAGE_MARKER).is_file()
    if (
        directory.is_dir()
        and not directory.is_symlink()
        and (marked or all(is_failure_marker(p) for p in directory.iterdir()))
    ):
        return None
    return (
        f"stage {stage.name}: {directory} exists and was not made by this pipeline (it has no "
        f"{STAGE_MARKER}), so the pipeline neither writes into it nor removes it: move it away, or choose "
        f"another output_dir or stage name"
    )


def remove_stage_dir(stage: Stage) -> None:
    """Remove the stage's directory (``foreign`` said it is the pipeline's) at once for the other ranks:
    renamed away first, so none of them sees a half-removed directory without its marker."""
    doomed = stage.dir.with_name(f".{stage.dir.name}.removed-{uuid.uuid4().hex[:8]}")
    stage.dir.rename(doomed)
    shutil.rmtree(doomed)


def failure_marker(stage: Stage, rank: int) -> Path:
    return stage.dir / ("failed.json" if rank == 0 else f"failed.rank{rank}.json")


def is_failure_marker(path: Path) -> bool:
    return path.name.startswith("failed") and path.suffix == ".json"


def mark_failure(stage: Stage, key: str, launch: str, rank: int, message: str) -> None:
    """Tell this launch's other ranks that this rank failed at this stage (as far as the disk allows:
    the error in hand is what this rank reports either way)."""
    with contextlib.suppress(OSError):
        stage.dir.mkdir(parents=True, exist_ok=True)  # a failure before prepare made it
        marker = {"key": key, "launch": launch, "rank": rank, "error": message, "failed": now()}
        write_json(failure_marker(stage, rank), marker)


def failure_elsewhere(stage: Stage, key: str, launch: str, rank: int) -> str | None:
    """The message of another rank's failure at this stage in this launch, if one is marked."""
    for path in sorted(p for p in stage.dir.glob("failed*.json") if is_failure_marker(p)):
        marker = read_json(path)
        if (
            marker is not None
            and marker.get("key") == key
            and marker.get("launch") == launch
            and marker.get("rank", 0) != rank
        ):
            return f"rank {marker.get('rank', 0)}: {marker.get('error')}"
    return None


@contextlib.contextmanager
def pipeline_lock(output_dir: Path, rank: int) -> Iterator[None]:
    """The output directory's lock, held by rank 0 while the pipeline runs (the other ranks follow rank
    0's markers): a second run on the same directory waits, naming the holder, until the first ends."""
    if rank != 0:
        yield
        return
    with WriterLock(output_dir, what="pipeline output"):
        yield


def run_child(
    command: list[str], env: dict[str, str] | None = None, stop_when: Callable[[], str | None] | None = None
) -> int:
    """Run ``command`` to its end and return its exit code. The child dies with this process (a killed
    runner leaves no fit behind to race a rerun), SIGTERM and SIGINT sent to this process are passed on
    (a fit saves its checkpoint and stops), and ``stop_when`` is asked while it runs: a message ends
    the child and is raised (``OtherRankFailed``)."""
    child = subprocess.Popen(command, env=env, preexec_fn=die_with_parent())
    previous = {}
    if threading.current_thread() is threading.main_thread():  # only it may set signal handlers
        previous = {s: signal.signal(s, lambda signum, _: child.send_signal(signum)) for s in FORWARDED}
    try:
        while True:
            try:
                return child.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                reason = stop_when() if stop_when is not None else None
                if reason is not None:
                    raise OtherRankFailed(reason) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child.poll() is None:  # given up on: stopped (a fit saves where it is), killed if it lingers
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when this process ends (``PR_SET_PDEATHSIG``);
    None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request: nobody would send the signal
            os._exit(1)

    return preexec


def stage_command(stage: Stage, resume_from: str | None) -> list[str]:
    if stage.prunes:
        return [sys.executable, "-m", "distill", "prune", "--config", str(stage.dir / "config.yaml")]
    return fit_command(stage, resume_from)


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
    """Fold the stage's adapter into its base, in its own process (as the fit, its memory freed after),
    loaded with the pipeline's own ``model_kwargs``: merge never takes ``trust_remote_code`` from the
    adapter folder's saved config."""
    model_kwargs = stage.config["model"]["init_args"].get("model_kwargs") or {}
    command = [sys.executable, "-m", "distill", "merge", "--adapter", str(stage.export), "--output"]
    command += [str(stage.merged), "--model_kwargs", json.dumps(model_kwargs)]
    shutil.rmtree(stage.merged, ignore_errors=True)
    if run_child(command) != 0:
        raise PipelineError(f"stage {stage.name}: merging {stage.export} failed (the error is above)")


def launch_id() -> str:
    """The same on every rank of one launch, another in the next: a rank waiting for rank 0 ignores what
    an earlier, killed launch left."""
    return ".".join(os.environ.get(name, "") for name in LAUNCH)


def wait_for(
    path: Path, key: str, failed: Callable[[], str | None], launch: str | None = None
) -> dict[str, Any]:
    """Rank 0's marker ``path`` once it holds ``key`` (and ``launch``); a failure another rank of this
    launch marked (``failed``'s message) is raised."""
    while True:
        marker = read_json(path)
        if marker is not None and marker.get("key") == key and launch in (None, marker.get("launch")):
            return marker
        reason = failed()
        if reason is not None:
            raise OtherRankFailed(reason)
        time.sleep(POLL_SECONDS)


def write_json(path: Path, values: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(values, indent=2) + "\n")
    partial.replace(path)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def log(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def describe(stages: list[Stage], selected: set[str], hashes: ContentHashes) -> tuple[str, list[str]]:
    """The plan ``--dry_run`` prints (each stage's status, inputs, outputs and command), and why the
    stages that a run would refuse are refused."""
    lines, upstream, refusals = [], None, []
    for index, stage in enumerate(stages, start=1):
        key = stage_key(stage, upstream, data_digest(stage.config, hashes))
        marker = completion(stage, key)
        upstream = marker["run_id"] if marker else None
        if marker:
            status = "complete, skipped"
        elif stage.name not in selected:
            status = "not selected"
        elif foreign(stage):
            refusals.append(foreign(stage))
            status = f"refused: {stage.dir} was not made by this pipeline"
        elif stage.checkpoint.exists() and (read_json(stage.dir / STAGE_MARKER) or {}).get("key") == key:
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
        lines.append(f"   run: python {' '.join(stage_command(stage, None)[1:])}")
    return "\n".join(lines), refusals
