"""``python -m distill tokenize --config C.yaml``: build the tokenized-data cache alone (on a CPU node,
before a GPU job), as the fit's ``prepare_data`` would."""

from __future__ import annotations

from distill.cli import exit_codes, run_cli


def main(argv: list[str]) -> None:
    with exit_codes():
        run_cli(argv, run=False).datamodule.prepare_data()
