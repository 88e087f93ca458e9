"""Scale-out paths on CPU: the SLURM launch environment, DDP KD against one process, exact resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_kd import kd_config
from tests.test_kd import teacher_dir as teacher_dir

LAUNCH_VARS = ("MASTER_", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "RANK", "PL_", "SLURM", "GROUP_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, **extra}


def run(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "distill", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(directory: Path) -> dict[int, float]:
    """train/loss by step from the run's CSV log."""
    return losses_named(directory, "train/loss")


def test_slurm_launch_sets_ranks_and_world_size(tmp_path, teacher_dir):
    """What `srun` does for 1 node x 2 tasks: two processes with SLURM's variables; Lightning's
    SLURMEnvironment must read ranks and world size from them."""
    config = kd_config(tmp_path, teacher_dir)
    probe = json.dumps(
        [{"class_path": "tests.probes.RankProbe", "init_args": {"directory": str(tmp_path / "ranks")}}]
    )
    args = [
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.num_nodes",
        "1",
        "--trainer.callbacks",
        probe,
    ]
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "distill",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_CPUS_PER_TASK": "1",
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "distill", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(**slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    facts = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [f["global_rank"] for f in facts] == [0, 1] and [f["local_rank"] for f in facts] == [0, 1]
    assert all(f["world_size"] == 2 and f["node_rank"] == 0 for f in facts)
    assert all(f["environment"] == "SLURMEnvironment" and f["main_address"] == "127.0.0.1" for f in facts)


@pytest.mark.parametrize("chunked", [False, True], ids=["cached", "chunked"])
def test_killed_kd_fit_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path, teacher_dir, chunked):
    extra = {"cache_size_gb": 2e-4} if chunked else {}
    steps = [
        "--trainer.max_steps",
        "10",
        "--trainer.enable_checkpointing",
        "true",
        "--trainer.val_check_interval",
        "100",
    ]

    def config_in(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        config = yaml.safe_load(kd_config(directory, teacher_dir, n=48, **extra).read_text())
        return with_last_checkpoint(config, directory)

    check_killed_fit_resumes(tmp_path, config_in, steps)


def with_last_checkpoint(config: dict, directory: Path) -> Path:
    """The run config with a checkpoint every step in a fixed dirpath (how a new process finds
    ``--ckpt_path last``), written to ``directory/run.yaml``."""
    checkpoint = {"every_n_train_steps": 1, "save_last": True, "save_top_k": 0}
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {**checkpoint, "dirpath": str(directory / "checkpoints")},
        }
    ]
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_killed_fit_resumes(tmp_path: Path, config_in: Callable[[str], Path], steps: list[str]) -> None:
    """A fit SIGKILLed at step 6 and resumed with ``--ckpt_path last`` logs steps 6-9 with the losses of
    an uninterrupted run of 10 steps."""
    run(["fit", "--config", str(config_in("reference")), *steps], clean_env())
    resumed = config_in("resumed")
    kill = json.dumps({"class_path": "tests.probes.KillAt", "init_args": {"step": 6}})
    killed = run(
        ["fit", "--config", str(resumed), *steps, "--trainer.callbacks+", kill], clean_env(), check=False
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    run(["fit", "--config", str(resumed), *steps, "--ckpt_path", "last"], clean_env())
    want = losses(tmp_path / "reference")
    assert sorted(want) == list(range(10))
    # the resumed process logged from step 6 on: it started from the checkpoint, not from scratch
    (resumed_log,) = (tmp_path / "resumed").rglob("version_1")
    got = losses(resumed_log)
    assert sorted(got) == list(range(6, 10))
    assert all(abs(want[s] - got[s]) < 1e-5 for s in got), {s: (want[s], got[s]) for s in got}


def test_two_process_ddp_kd_fit_matches_one_process(tmp_path, teacher_dir):
    """Two ranks with 4 rows each see the samples one process sees with 8 rows per step, so the model
    after training, hence its validation loss, matches; the KD cache is collected as disjoint shards."""

    def fit(name: str, *extra: str) -> float:
        directory = tmp_path / name
        directory.mkdir()
        config = kd_config(directory, teacher_dir, n=32)
        run(
            [
                "fit",
                "--config",
                str(config),
                "--trainer.max_steps",
                "4",
                "--trainer.val_check_interval",
                "4",
                "--trainer.num_sanity_val_steps",
                "0",
                *extra,
            ],
            clean_env(),
        )
        val = [v for step, v in losses_named(directory, "val/loss").items()]
        assert len(val) == 1
        return val[0]

    one = fit("one", "--data.init_args.batch_size", "8")
    two = fit(
        "two", "--data.init_args.batch_size", "4", "--trainer.strategy", "ddp", "--trainer.devices", "2"
    )
    assert abs(one - two) < 1e-4 * max(1.0, abs(one)), (one, two)
    ranks = {p.name[:4] for p in (tmp_path / "two" / "cache" / "train").glob("*.h5")}
    assert ranks == {"r000", "r001"}


def losses_named(directory: Path, name: str) -> dict[int, float]:
    out = {}
    for path in directory.rglob("metrics.csv"):
        for row in csv.DictReader(path.open()):
            if row.get(name):
                out[int(row["step"])] = float(row[name])
    return out
