"""``cdtrain submit | status | list | watch | cancel``: the service's HTTP API from the command line.

Wire into ``cdtrain/cli.py`` like the ML commands::

    from cdtrain.client import cli as client_cli
    client_cli.register(subparsers)

Each parser sets ``runner=run``. Importing this module loads neither aiohttp nor torch; the
environment (``CDTRAIN_URL``, ``CDTRAIN_API_TOKEN``) is read only in :func:`run`.

Exit codes: 0 done (``watch``: the job SUCCEEDED; ``cancel``: the cancel was accepted), 1 the job
FAILED or was CANCELLED, 2 bad input, unknown job, a job that already ended (``cancel``), refused
token or unreachable service, 3 the service is unavailable (503,
retry later) or answered something unexpected.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping
from typing import Any

from cdtrain.client.settings import DEFAULT_URL, TOKEN_ENV, URL_ENV, ClientSettings

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

COMMANDS = ("submit", "status", "list", "watch", "cancel")


def register(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser("submit", help="submit a training job to the service")
    submit.add_argument("dataset_uri", metavar="DATASET_URI",
                        help="s3://bucket/prefix/, s3://bucket/data.zip, or a path the service can read")
    submit.add_argument("--config", dest="config_uri", metavar="URI", help="a YAML training config (same URI forms)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (value parsed as YAML); repeatable")
    submit.add_argument("--register", action="store_true", help="register the trained model in MLflow")
    submit.add_argument("--model-name", metavar="NAME", help="registered model name (service default snunet-cbam)")
    submit.add_argument("--idempotency-key", metavar="K", help="the same key never starts a second job")
    submit.add_argument("--watch", action="store_true", help="then follow the job like `cdtrain watch`")
    _common(submit, "submit")

    status = subparsers.add_parser("status", help="show one job of the service")
    status.add_argument("job_id", metavar="JOB_ID", help="the job's id (from submit or list)")
    status.add_argument("--json", action="store_true", help="print the job view as JSON")
    _common(status, "status")

    jobs = subparsers.add_parser("list", help="list the service's jobs, newest first")
    jobs.add_argument("--status", metavar="STATE", help="only jobs in this state (queued, running, failed, ...)")
    jobs.add_argument("--limit", type=int, metavar="N", help="at most N jobs (service default 50)")
    jobs.add_argument("--cursor", help="the next page: the cursor a previous `list` printed")
    jobs.add_argument("--json", action="store_true", help="print the page as JSON (jobs, next_cursor)")
    _common(jobs, "list")

    watch = subparsers.add_parser("watch", help="follow a job live until it ends (exit 0 if it succeeded)")
    watch.add_argument("job_id", metavar="JOB_ID", help="the job's id (from submit or list)")
    _common(watch, "watch")

    cancel = subparsers.add_parser("cancel", help="cancel a queued or running job (it ends CANCELLED)")
    cancel.add_argument("job_id", metavar="JOB_ID", help="the job's id (from submit or list)")
    cancel.add_argument("--json", action="store_true", help="print the service's answer as JSON")
    _common(cancel, "cancel")


def _common(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--url", help=f"the service (default: ${URL_ENV} or {DEFAULT_URL}); "
                                      f"token from ${TOKEN_ENV}")
    parser.set_defaults(runner=run, client_command=command)


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None, **overrides: Any) -> int:
    """Run a parsed client command; every failure becomes a message on stderr and an exit code.

    ``environ`` defaults to ``os.environ``; ``overrides`` set other :class:`ClientSettings` fields
    (timeouts, reconnect delays).
    """
    try:
        from cdtrain.client import commands
        from cdtrain.client.errors import ApiError
    except ModuleNotFoundError as exc:  # aiohttp comes with the [service] extra
        return _fail(f"the client commands need {exc.name}: pip install 'cdtrain[service]'", EXIT_BAD_INPUT)

    try:
        settings = ClientSettings.from_env(os.environ if environ is None else environ, url=args.url,
                                           **overrides)
    except ValueError as exc:
        return _fail(f"bad service URL: {_first_error(exc)}", EXIT_BAD_INPUT)
    try:
        return asyncio.run(commands.COMMANDS[args.client_command](settings, args))
    except commands.BadInput as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except ApiError as exc:
        return _fail(*describe(exc))
    except KeyboardInterrupt:
        job = getattr(args, "job_id", None)
        hint = f"; the job goes on (cdtrain watch {job})" if job else ""
        return _fail(f"interrupted{hint}", EXIT_INTERRUPTED)


def describe(exc: Exception) -> tuple[str, int]:
    """The message and exit code for an :class:`~cdtrain.client.errors.ApiError`."""
    from cdtrain.client import errors

    if isinstance(exc, errors.RequestRejected):
        if exc.details:
            lines = "\n".join(f"  {d.field}: {d.message}" for d in exc.details)
            return f"the service rejected the request (HTTP {exc.status}):\n{lines}", EXIT_BAD_INPUT
        return f"the service rejected the request (HTTP {exc.status}): {exc}", EXIT_BAD_INPUT
    if isinstance(exc, errors.ServiceUnavailable):
        retry = "" if exc.retry_after is None or "retry" in str(exc) else f"; retry in {exc.retry_after:g} s"
        return f"the service is unavailable (HTTP 503): {exc}{retry}", EXIT_UNAVAILABLE
    if isinstance(exc, (errors.StreamInterrupted, errors.UnexpectedResponse)):
        return str(exc), EXIT_UNAVAILABLE
    if isinstance(exc, errors.JobEnded):
        return str(exc), EXIT_BAD_INPUT
    if isinstance(exc, errors.Conflict) and exc.job_id:
        return f"{exc} (existing job {exc.job_id})", EXIT_BAD_INPUT
    return str(exc), EXIT_BAD_INPUT


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return str(errors()[0]["msg"]).removeprefix("Value error, ")
    return str(exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdtrain", description="client of the cdtrain service")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None, **overrides: Any) -> int:
    """The client commands alone (tests, ``python -m cdtrain.client``)."""
    return run(build_parser().parse_args(argv), environ, **overrides)
