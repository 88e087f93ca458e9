"""The parser: LightningCLI's fit/validate/test/predict (and ``collect``, predict by its name for teacher
collection) with distill's options, and how its refusals end the process. The other commands
(``distill.commands``) import it; it imports none of them."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import signal
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint, ProgressBar
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

import distill
from distill.callbacks import LoopProgress, ModelSummary, PreemptionCheckpoint
from distill.callbacks.hf_export import untrained_reason

OWN_CODE = (Path(distill.__file__).parent, Path(distill.callbacks.__file__).parent)


def resolve_precision(precision: str | int | None) -> str | int | None:
    """``auto``: bf16 mixed where the GPU supports it, else fp16 mixed on GPU, full fp32 on CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class LogConfigCallback(SaveConfigCallback):
    """Also logs the resolved config to every logger (W&B, ...)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": json.loads(config)})


class ConfigError(Exception):
    """A value our own classes refused while the config was instantiated, or an option the run cannot
    follow: ``main`` prints it as one line and exits 2."""


def own_refusal(error: BaseException) -> ValueError | None:
    """The outermost ValueError in ``error``'s chain of causes (under jsonargparse's wrapping) that one of
    distill's classes raised, if any."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ValueError) and cause.__traceback__ is not None:
            tb = cause.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            raised_in = Path(tb.tb_frame.f_code.co_filename).resolve()
            if any(raised_in.is_relative_to(root) for root in OWN_CODE):
                return cause
        cause = cause.__cause__
    return None


# jsonargparse's refusal of an option a class_path's class does not take
NOT_ACCEPTED = re.compile(
    r"Parser key \"(\w+)\".*?class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", re.S
)


def moved_option(message: str) -> str | None:
    """One line for an option the parser refused that its class lists in ``moved_options`` (old name ->
    where it went), instead of the parser's union errors."""
    found = NOT_ACCEPTED.search(message)
    if found is None:
        return None
    key, class_path, option = found.groups()
    module, _, name = class_path.rpartition(".")
    moved = getattr(getattr(importlib.import_module(module), name, None), "moved_options", {}).get(option)
    return f"{key}.{option} moved: {moved}" if moved else None


LAST_IF_ANY = "last_if_any"


def resume_point(trainer: L.Trainer, ckpt_path: str | Path | None) -> str | Path | None:
    """What ``trainer.fit`` gets for ``--ckpt_path``. ``last`` must find a last checkpoint: Lightning's
    ``last`` starts from scratch (after a warning) when there is none, which trains a killed run's steps
    again from step 0. ``last_if_any`` asks for that: Lightning's ``last``."""
    if ckpt_path == LAST_IF_ANY:
        return "last"
    if ckpt_path != "last":
        return ckpt_path
    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    # where Lightning looks (connectors/checkpoint_connector.py): each ModelCheckpoint's last*.ckpt and
    # each OnExceptionCheckpoint's file
    found = [path for c in checkpoints for path in c._find_last_checkpoints(trainer)]
    found += [c.ckpt_path for c in trainer.callbacks if isinstance(c, OnExceptionCheckpoint)]
    if any(Path(path).exists() for path in found):
        return "last"
    where = "the run has no ModelCheckpoint, so nothing saves a last checkpoint"
    if checkpoints:  # where each keeps its last checkpoint: ModelCheckpoint's rule, applied in its setup
        default = "the logger's new version directory (ModelCheckpoint has no dirpath)"
        if not trainer.loggers:
            default = str(Path(trainer.default_root_dir) / "checkpoints")
        looked = ", ".join(str(c.dirpath) if c.dirpath else default for c in checkpoints)
        where = f"no last checkpoint (last*.ckpt) in {looked}"
    raise ConfigError(
        f"--ckpt_path last: {where}. Give a checkpoint's path, or --ckpt_path {LAST_IF_ANY} to start "
        "from scratch when there is none"
    )


LIGHTNING_NOTES = (
    "💡 Tip:",  # its cloud products ("... try installing litlogger")
    "Trainer already configured with model summary callbacks",  # distill's, which replaces its own
)


def not_a_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LIGHTNING_NOTES)


def quiet_lightning() -> None:
    """Silence what Lightning and torch print that a distill user can do nothing about: its notes, torch's
    ``LeafSpec`` deprecation (Lightning's code), an IterableDataset's ``__len__`` (distill's deal batches
    to workers, so their lengths hold) and ``args`` beside a command line (distill hands its own)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(not_a_note)  # once: same object
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    warnings.filterwarnings("ignore", r"Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", r"LightningCLI's args parameter")


class DistillCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--precision", type=str | int | None, default=None,
            help="Like trainer.precision, plus 'auto': bf16-mixed if supported, else 16-mixed; 32 on CPU",
        )  # fmt: skip
        parser.add_argument(
            "--validate_after_fit", type=bool, default=False,
            help="Validate the final weights once fit ends (what a pipeline stage's eval_results.json holds)",
        )  # fmt: skip
        # the student's (or teachers') tokenizer is the data's: configured once, on the model
        parser.link_arguments("model.tokenizer_id", "data.init_args.tokenizer", apply_on="instantiate")
        # in every run, not only in configs that list it: a pre-empted fit must never lose its steps
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        # progress a log file shows too (plain lines where stdout is no terminal), without listing it
        parser.add_lightning_class_args(LoopProgress, "progress")

    def parse_arguments(self, parser, args) -> None:
        subcommands = getattr(self, "_subcommand_parsers", {})  # none under run=False
        parsers = [parser, *subcommands.values()]
        for each in parsers:  # raise, so that a moved option can be told where it went
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
            return
        except ArgumentError as error:
            refused = error
        finally:
            for each in parsers:
                each.exit_on_error = True
        moved = moved_option(str(refused))
        if moved is not None:
            raise ConfigError(moved)
        given = sys.argv[1:] if args is None else args
        failed = next((subcommands[a] for a in given if a in subcommands), parser)
        failed.error(str(refused))  # the parser's own usage and message

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("precision") is not None:
            config.trainer.precision = resolve_precision(config.precision)
            rank_zero_info(f"[distill] precision: {config.trainer.precision}")

    def fit(self, model: L.LightningModule, **kwargs) -> None:
        kwargs["ckpt_path"] = resume_point(self.trainer, kwargs.get("ckpt_path"))
        self.trainer.fit(model, **kwargs)

    def after_fit(self) -> None:
        if self.config.fit.get("validate_after_fit") and untrained_reason(self.trainer) is None:
            self.trainer.validate(self.model, datamodule=self.datamodule)

    def _instantiate_trainer(self, config: dict, callbacks: list[Callback]) -> L.Trainer:
        # Lightning takes one progress bar: none if enable_progress_bar is false, the config's if it lists one
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        if config.get("enable_progress_bar") is False or any(isinstance(c, ProgressBar) for c in listed):
            callbacks = [c for c in callbacks if not isinstance(c, LoopProgress)]
        # Lightning's own summary prints "Total FLOPs: 0" (distill.callbacks.ModelSummary)
        if config.get("enable_model_summary") is not False and not any(
            isinstance(c, LightningModelSummary) for c in listed
        ):
            callbacks = [*callbacks, ModelSummary()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            refusal = own_refusal(error)
            if refusal is None:
                raise
            raise ConfigError(str(refusal)) from error


def run_cli(args: list[str] | None = None, run: bool = True) -> DistillCLI:
    quiet_lightning()
    return DistillCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_callback=LogConfigCallback, save_config_kwargs={"overwrite": True}, args=args, run=run,
    )  # fmt: skip


@contextlib.contextmanager
def exit_codes() -> Iterator[None]:
    """How a run of the parser ends the process: a ``ConfigError`` as its one line and exit 2, Lightning's
    SIGTERM stop as a failure."""
    try:
        yield
    except ConfigError as error:
        # our message alone, not under jsonargparse's "Does not validate against any of the Union subtypes"
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException as stop:
        # Lightning's own SIGTERM stop (outside training steps) exits 0; a stopped run has not succeeded
        raise SystemExit(stop.code or 128 + signal.SIGTERM) from None


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "collect":
        argv = ["predict", *args[1:]]
    with exit_codes():
        run_cli(argv)
