"""The client commands as coroutines over :class:`~cdtrain.client.api.ApiClient`; ``cli.run`` drives them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from cdtrain.client.api import ApiClient
from cdtrain.client.cli import EXIT_JOB_FAILED, EXIT_OK
from cdtrain.client.follow import follow
from cdtrain.client.format import jobs_table, progress_line, status_text, summary
from cdtrain.client.models import JobView, StatusEvent
from cdtrain.client.settings import ClientSettings
from schemas.jobs import JobState


class BadInput(ValueError):
    """Arguments the client itself rejects before asking the service."""


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``--set`` values, parsed as the training CLI parses them (snunet_cbam.config imports no torch)."""
    from schemas.training import ConfigError
    from snunet_cbam.config import parse_overrides as parse

    try:
        return parse(pairs)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None


def _out(text: str) -> None:
    print(text, flush=True)


async def submit(settings: ClientSettings, args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    async with ApiClient(settings) as api:
        accepted = await api.submit(args.dataset_uri, config_uri=args.config_uri, config=overrides or None,
                                    register_model=args.register, model_name=args.model_name,
                                    idempotency_key=args.idempotency_key)
        _out(accepted.job_id)
        if accepted.duplicate:
            print(f"note: idempotency key already used: this is the existing job (state {accepted.state})",
                  file=sys.stderr, flush=True)
        return await _watch(api, accepted.job_id) if args.watch else EXIT_OK


async def status(settings: ClientSettings, args: argparse.Namespace) -> int:
    async with ApiClient(settings) as api:
        view = await api.get(args.job_id)
    _out(view.model_dump_json(indent=2) if args.json else status_text(view))
    return EXIT_OK


async def cancel(settings: ClientSettings, args: argparse.Namespace) -> int:
    async with ApiClient(settings) as api:
        answer = await api.cancel(args.job_id)
    _out(answer.model_dump_json(indent=2) if args.json else answer.message)
    return EXIT_OK


async def list_jobs(settings: ClientSettings, args: argparse.Namespace) -> int:
    async with ApiClient(settings) as api:
        page = await api.list(status=args.status, limit=args.limit, cursor=args.cursor)
    if args.json:
        _out(page.model_dump_json(indent=2))
        return EXIT_OK
    _out(jobs_table(page.jobs) if page.jobs else "no jobs" + (f" in state {args.status}" if args.status else ""))
    if page.next_cursor:
        print(f"more: cdtrain list --cursor {page.next_cursor}", file=sys.stderr, flush=True)
    return EXIT_OK


async def watch(settings: ClientSettings, args: argparse.Namespace) -> int:
    async with ApiClient(settings) as api:
        return await _watch(api, args.job_id)


async def _watch(api: ApiClient, job_id: str) -> int:
    printer = _ProgressPrinter()
    final = await follow(api, job_id, printer,
                         on_notice=lambda text: print(f"note: {text}", file=sys.stderr, flush=True))
    _out(summary(final))
    return EXIT_OK if final.state is JobState.SUCCEEDED else EXIT_JOB_FAILED


class _ProgressPrinter:
    """One line per change; a heartbeat that only re-states the last line prints nothing."""

    def __init__(self) -> None:
        self._last = ""

    def __call__(self, view: JobView, event: StatusEvent | None) -> None:
        line = progress_line(view, event)
        _, _, text = line.partition("  ")  # the line without its time
        if text != self._last:
            self._last = text
            _out(line)


COMMANDS: dict[str, Callable[[ClientSettings, argparse.Namespace], Awaitable[int]]] = {
    "submit": submit, "status": status, "list": list_jobs, "watch": watch, "cancel": cancel,
}
