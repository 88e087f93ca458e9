"""``python -m distill prune --model T --output S [--config prune.yaml]``: a smaller model of the same
architecture cut from ``T`` by structured pruning (docs/prune.md), to be distilled from ``T``. Its options
are ``distill.prune.run.prune``'s arguments (``--pruning.num_layers 4``, ``--data.train_files ...``)."""

from __future__ import annotations

import sys

from jsonargparse import ActionConfigFile, ArgumentParser

from distill.prune.options import PruningError
from distill.prune.run import prune


def parser() -> ArgumentParser:
    """The command's parser (the pipeline resolves a prune stage's config with it)."""
    parser = ArgumentParser(prog="python -m distill prune", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of the options below")
    parser.add_function_arguments(prune)
    return parser


def main(argv: list[str]) -> None:
    arguments = parser()
    options = arguments.instantiate_classes(arguments.parse_args(argv))
    try:
        prune(options.model, options.output, options.pruning, options.data)
    except PruningError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
