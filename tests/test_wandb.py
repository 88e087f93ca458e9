"""W&B through the config, offline, with no network."""

import time

import yaml

from distill.cli import main
from tests.helpers import write_config


def test_wandb_logger_offline(tmp_path, chat_file, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = write_config(tmp_path, chat_file)
    override = tmp_path / "wandb.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "logger": {
                        "class_path": "lightning.pytorch.loggers.WandbLogger",
                        "init_args": {
                            "project": "distill-test",
                            "save_dir": str(tmp_path),
                            "name": "tiny",
                            "group": "ablation-a",
                        },
                    },
                    "callbacks": [
                        {
                            "class_path": "distill.callbacks.HFExport",
                            "init_args": {"dirpath": str(tmp_path / "export"), "log_artifact": True},
                        }
                    ],
                }
            }
        )
    )
    main(["fit", "--config", str(config), "--config", str(override), "--trainer.max_steps", "3"])
    import wandb

    wandb.finish()  # flushes the run's records to its offline file
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(iter(runs[0].glob("*.wandb")))
    # wandb-core may still be writing the offline file when finish() returns (seen under load)
    deadline = time.monotonic() + 60
    while b"model-" not in (record := log.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"ablation-a" in record  # the group
    assert b"train_on_responses_only" in record  # the resolved config, logged as the run's config
    assert b"model-" in record and b"artifact" in record.lower()  # the HF export as a model artifact
    assert (tmp_path / "export" / "config.json").exists()
