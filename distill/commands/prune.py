"""``python -m distill prune --model T --output S [--config prune.yaml]``: a smaller model of the same
architecture cut from ``T`` by structured pruning (docs/prune.md), to be distilled from ``T``. Its options
are ``distill.prune.run.prune``'s arguments (``--pruning.num_layers 4``, ``--data.train_files ...``)."""

from __future__ import annotations

import sys

from jsonargparse import auto_cli

from distill.prune.options import PruningError
from distill.prune.run import prune


def main(argv: list[str]) -> None:
    try:
        auto_cli(prune, args=argv, as_positional=False)
    except PruningError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
