"""Scale-out paths on CPU: a SLURM-launched DDP KD fit against one process, exact resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    check_killed_fit_resumes,
    clean_env,
    kd_config,
    losses_named,
    run,
    start,
    with_last_checkpoint,
)


def test_a_slurm_launched_two_rank_kd_fit_matches_one_process(tmp_path, kd_teacher_dir):
    """What `srun` does for 1 node x 2 tasks: two processes with SLURM's variables; Lightning's
    SLURMEnvironment must read ranks and world size from them. The two ranks with 4 rows each see the
    samples one process sees with 8 rows per step, so the model after training, hence its validation
    loss, matches; the KD cache is collected as disjoint shards."""
    quick = [
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "4",
        "--trainer.num_sanity_val_steps",
        "0",
    ]

    def val_loss(directory: Path) -> float:
        val = [v for step, v in losses_named(directory, "val/loss").items()]
        assert len(val) == 1
        return val[0]

    one = tmp_path / "one"
    one.mkdir()
    config = kd_config(one, kd_teacher_dir, n=32)
    run(["fit", "--config", str(config), *quick, "--data.init_args.batch_size", "8"], clean_env())

    two = tmp_path / "two"
    two.mkdir()
    config = kd_config(two, kd_teacher_dir, n=32)
    probe = json.dumps(
        [{"class_path": "tests.probes.RankProbe", "init_args": {"directory": str(tmp_path / "ranks")}}]
    )
    args = ["fit", "--config", str(config), *quick, "--data.init_args.batch_size", "4"]
    args += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.num_nodes", "1"]
    args += ["--trainer.callbacks", probe]
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
    # each task its own ``python -m distill`` (forked: the same fresh process, without its imports)
    errors = [tmp_path / f"rank{rank}.err" for rank in range(2)]
    processes = [
        start(
            args,
            clean_env(**slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
            os.devnull,
            errors[rank],
        )
        for rank in range(2)
    ]
    for process in processes:
        process.join(timeout=600)
        if process.exitcode is None:
            process.kill()
    assert all(p.exitcode == 0 for p in processes), "".join(e.read_text()[-3000:] for e in errors)
    facts = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [f["global_rank"] for f in facts] == [0, 1] and [f["local_rank"] for f in facts] == [0, 1]
    assert all(f["world_size"] == 2 and f["node_rank"] == 0 for f in facts)
    assert all(f["environment"] == "SLURMEnvironment" and f["main_address"] == "127.0.0.1" for f in facts)

    alone, ranks = val_loss(one), val_loss(two)
    assert abs(alone - ranks) < 1e-4 * max(1.0, abs(alone)), (alone, ranks)
    assert {p.name[:4] for p in (two / "cache" / "train").glob("*.h5")} == {"r000", "r001"}


@pytest.mark.parametrize("chunked", [False, True], ids=["cached", "chunked"])
def test_killed_kd_fit_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path, kd_teacher_dir, chunked):
    extra = {"cache_size_gb": 6e-5} if chunked else {}  # 60 kB: 4 chunks of the ~104 kB of targets
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
        config = yaml.safe_load(kd_config(directory, kd_teacher_dir, n=48, **extra).read_text())
        return with_last_checkpoint(config, directory)

    check_killed_fit_resumes(tmp_path, config_in, steps)
    assert (tmp_path / "resumed" / "cache" / "train-chunks").is_dir() == chunked
    assert (tmp_path / "resumed" / "cache" / "train").is_dir() != chunked
