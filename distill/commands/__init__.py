"""``python -m distill COMMAND``: the commands beside LightningCLI's own. Each module here is one
command's argument parsing and output; what it runs lives in its own layer (``data``, ``cache``,
``rollout``, ``train``, ``pipeline``). A command that reads a training config imports the parser
(``distill.cli``); ``distill.cli`` imports no command."""

from __future__ import annotations

import sys
from importlib import import_module

# imported only when named: ``python -m distill fit`` loads none of them
COMMANDS = {
    "inspect": "distill.commands.preview",
    "tokenize": "distill.commands.pretokenize",
    "generate": "distill.commands.generate",
    "merge": "distill.commands.merge",
    "prune": "distill.commands.prune",
    "cache": "distill.commands.cache",
    "pipeline": "distill.commands.pipeline",
}


def main(argv: list[str] | None = None) -> None:
    """Run the command ``argv`` names; anything else (fit, validate, test, predict, collect) is
    LightningCLI's."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        return import_module(COMMANDS[args[0]]).main(list(args[1:]))
    from distill.cli import main as lightning_main

    return lightning_main(argv)
