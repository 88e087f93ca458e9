"""``python -m distill``: LightningCLI's fit/validate/test/predict, plus ``collect``, ``inspect``,
``merge`` and ``cache stats``."""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from distill.data.datamodule import DataModule


def resolve_precision(precision: str | int | None) -> str | int | None:
    """``auto``: bf16 mixed where the GPU supports it, else fp16 mixed on GPU, full fp32 on CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class LogConfigCallback(SaveConfigCallback):
    """Saves the resolved config to the log directory and also logs it to every logger (W&B, ...)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": json.loads(config)})


class DistillCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--precision",
            type=str | int | None,
            default=None,
            help="Like trainer.precision, plus 'auto': bf16-mixed if supported, else 16-mixed; 32 on CPU",
        )
        # the student's (or teachers') tokenizer is the data's: configured once, on the model
        parser.link_arguments("model.tokenizer_id", "data.init_args.tokenizer", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("precision") is not None:
            config.trainer.precision = resolve_precision(config.precision)
            rank_zero_info(f"[distill] precision: {config.trainer.precision}")


def run_cli(args: list[str] | None = None, run: bool = True) -> DistillCLI:
    return DistillCLI(
        L.LightningModule,
        DataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "inspect":
        from distill.data.preview import main as inspect_main

        return inspect_main(args[1:])
    if args and args[0] == "merge":
        from distill.train.merge import main as merge_main

        return merge_main(args[1:])
    if args and args[0] == "cache":
        from distill.cache.cli import main as cache_main

        return cache_main(args[1:])
    if args and args[0] == "collect":  # a friendlier name for teacher collection
        argv = ["predict", *args[1:]]
    run_cli(argv)
