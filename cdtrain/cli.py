"""Entry point of ``cdtrain``.

Only the chosen command's modules are imported, so ``cdtrain submit`` never loads torch and
``cdtrain train`` never loads the HTTP stack.
"""

from __future__ import annotations

import argparse

from snunet_cbam import cli as ml_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdtrain", description="SNUNet-CBAM change-detection training")
    subparsers = parser.add_subparsers(dest="command", required=True)
    ml_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return ml_cli.run(args)
