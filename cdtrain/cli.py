"""Entry point of ``cdtrain``.

Only the chosen command's modules are imported, so ``cdtrain submit`` never loads torch and
``cdtrain train`` never loads the HTTP stack.
"""

from __future__ import annotations

import argparse

from cdtrain.client import cli as client_cli
from snunet_cbam import cli as ml_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdtrain", description="SNUNet-CBAM change-detection training")
    subparsers = parser.add_subparsers(dest="command", required=True)
    ml_cli.register(subparsers)
    client_cli.register(subparsers)
    serve = subparsers.add_parser("serve", help="run the service (all roles on embedded parts by default)")
    serve.add_argument("--role", choices=("all", "ingress", "consumer", "projector"), default="all")
    serve.set_defaults(runner=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from cdtrain.serve import main as serve_main

    return serve_main(args.role)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner = getattr(args, "runner", None)
    return runner(args) if runner else ml_cli.run(args)
