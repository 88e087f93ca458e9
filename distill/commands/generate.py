"""``python -m distill generate``: its options are ``distill.rollout.generate.generate``'s arguments."""

from __future__ import annotations

from jsonargparse import auto_cli

from distill.rollout.generate import generate


def main(argv: list[str]) -> None:
    auto_cli(generate, args=argv, as_positional=False)
