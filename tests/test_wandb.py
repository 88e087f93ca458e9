"""W&B through the config, offline, with no network."""

import yaml

from distill.cli import main
from tests.test_cli import write_config


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
                        "init_args": {"project": "distill-test", "save_dir": str(tmp_path), "name": "tiny"},
                    }
                }
            }
        )
    )
    main(["fit", "--config", str(config), "--config", str(override), "--trainer.max_steps", "3"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and next(iter(runs[0].glob("*.wandb"))).stat().st_size > 0
