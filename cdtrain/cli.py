"""Entry point of ``cdtrain``.

Only the chosen command's modules are imported, so ``cdtrain submit`` never loads torch and
``cdtrain train`` never loads the HTTP stack.
"""

from __future__ import annotations

import argparse

from cdtrain import config_cli
from cdtrain.client import cli as client_cli
from snunet_cbam import cli as ml_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdtrain", description="SNUNet-CBAM change-detection training")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the installed version of cdtrain and exit")
    subparsers = parser.add_subparsers(dest="command", required=True)
    ml_cli.register(subparsers)
    client_cli.register(subparsers)
    config_cli.register(subparsers)
    serve = subparsers.add_parser("serve", help="run the service (all roles on embedded parts by default)")
    serve.add_argument("--role", choices=("all", "ingress", "consumer", "projector"), default="all",
                       help="the role this process runs: all (default: every role in one process), ingress "
                            "(HTTP API and bucket events), consumer (the training worker) or projector "
                            "(job views and the watchdog)")
    serve.add_argument("--max-jobs", type=int, metavar="N",
                       help="consumer role: take N train requests, then exit 0 once the last has ended (1: one "
                            "Kubernetes Job per request; env CDTRAIN_WORKER_MAX_JOBS; default: no limit)")
    serve.add_argument("--idle-exit", type=float, metavar="SECONDS",
                       help="consumer role: exit 0 after SECONDS without a job in hand (env "
                            "CDTRAIN_WORKER_IDLE_EXIT_S; default 120 with --max-jobs, else never)")
    serve.set_defaults(runner=_serve)
    return parser


def version() -> str:
    """The installed distribution's version (pyproject.toml's, once installed)."""
    from importlib import metadata

    try:
        return metadata.version("cdtrain")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _serve(args: argparse.Namespace) -> int:
    from cdtrain.serve import main as serve_main

    return serve_main(args.role, max_jobs=args.max_jobs, idle_exit_s=args.idle_exit)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner = getattr(args, "runner", None)
    return runner(args) if runner else ml_cli.run(args)
