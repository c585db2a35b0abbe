"""Process wiring: connect the real bus and stores from settings, serve, and shut down cleanly.

    settings = IngressSettings.from_env(os.environ)
    asyncio.run(run_ingress(settings))          # or: python -m ingress

The ingress starts even when the broker or MongoDB is down (``/readyz`` says which; POST
answers 503 until they are back): a crash loop would also take down the read API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ingress.app import BUCKET_EVENTS, create_app
from ingress.settings import IngressSettings
from infra.logs import configure_logging
from schemas.topology import Topology

log = logging.getLogger(__name__)

_LISTENER_RETRY_S = 5.0


def open_object_store(settings: IngressSettings) -> Any:
    # Imported here: the S3 client library is the slowest import of the process.
    if settings.local_objects_dir is not None:
        from infra.objects.local import LocalObjectStore

        return LocalObjectStore(settings.local_objects_dir)
    from infra.objects.s3 import S3ObjectStore

    return S3ObjectStore(settings.s3)


async def run_ingress(settings: IngressSettings, *, stop: asyncio.Event | None = None,
                      on_started: Callable[[list[str]], None] | None = None, bus: Any = None,
                      view_store: Any = None, object_store: Any = None,
                      local_bucket_watch: bool = False, registry: Any = None) -> None:
    """Serve until ``stop`` is set (or the task is cancelled); ``on_started`` gets the URLs.

    ``bus``, ``view_store`` and ``object_store`` may be given (the all-in-one process shares them
    with the other roles; the caller then owns them); otherwise they are opened from settings.
    ``local_bucket_watch`` polls the local object directory for dropped datasets (embedded mode).
    ``registry``: the process's metrics registry (infra/metrics.py), served at ``/metrics``.
    """
    from infra.bus import BusUnavailable, create_bus
    from infra.views import open_view_store

    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:  # closes in reverse: HTTP, listeners, stores, bus
        if bus is None:
            bus = create_bus(settings.bus, Topology(prefix=settings.topology_prefix))
            stack.push_async_callback(bus.close)
        try:
            await bus.connect()
        except BusUnavailable as exc:
            log.warning("starting without the message bus (%s); POST /train answers 503 until it is back", exc)

        if view_store is None:
            view_store = open_view_store(settings.view_store_url, database=settings.view_store_database)
            stack.push_async_callback(view_store.close)
        try:
            await asyncio.wait_for(view_store.ensure_indexes(), settings.store_timeout_s)
        except Exception as exc:  # noqa: BLE001 - reads answer 503 until the store is back
            log.warning("job view store not reachable at start (%s)", exc)

        if object_store is None:
            object_store = open_object_store(settings)
            stack.push_async_callback(object_store.close)

        app = create_app(settings, bus, view_store, object_store, registry=registry)
        await _start_listeners(settings, app[BUCKET_EVENTS], stack)
        if local_bucket_watch and settings.local_objects_dir is not None:
            from ingress.local_watcher import LocalBucketWatcher

            watcher = LocalBucketWatcher(settings.local_objects_dir, settings.trigger.prefix, app[BUCKET_EVENTS])
            _background(stack, watcher.run())

        runner = web.AppRunner(app, shutdown_timeout=10.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        urls = [f"http://{host}:{port}" for host, port, *_ in runner.addresses]
        log.info("ingress listening on %s", ", ".join(urls))
        if on_started is not None:
            on_started(urls)
        await stop.wait()


async def _start_listeners(settings: IngressSettings, handler: Any, stack: contextlib.AsyncExitStack) -> None:
    if settings.bucket_events_amqp is not None:
        from ingress.amqp_listener import AmqpBucketListener

        listener = AmqpBucketListener(settings.bucket_events_amqp, handler)
        stack.push_async_callback(listener.close)
        _background(stack, _keep_trying(listener.start, "AMQP bucket-event listener"))
    if settings.sqs is not None:
        import aioboto3

        from ingress.sqs_poller import SqsBucketPoller

        s3 = settings.s3
        session = aioboto3.Session(
            aws_access_key_id=_secret(s3.access_key_id), aws_secret_access_key=_secret(s3.secret_access_key),
            aws_session_token=_secret(s3.session_token), region_name=settings.sqs.region)
        client = await stack.enter_async_context(session.client("sqs", endpoint_url=settings.sqs.endpoint_url))
        poller = SqsBucketPoller(client, settings.sqs, handler)
        stack.push_async_callback(poller.close)
        poller.start()


def _background(stack: contextlib.AsyncExitStack, coro: Awaitable[None]) -> None:
    task = asyncio.ensure_future(coro)

    async def cancel() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(cancel)


async def _keep_trying(start: Callable[[], Awaitable[None]], what: str) -> None:
    # The broker may come up after us; the HTTP API must not wait for it.
    while True:
        try:
            await start()
            return
        except Exception as exc:  # noqa: BLE001
            log.warning("%s not started (%s); retrying in %g s", what, exc, _LISTENER_RETRY_S)
            await asyncio.sleep(_LISTENER_RETRY_S)


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def main() -> int:
    """``python -m ingress``: settings from the environment, SIGTERM/SIGINT stop gracefully."""
    from ingress.security import InsecureStart, check_startup

    try:
        settings = IngressSettings.from_env(os.environ)
        configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=settings.secret_values(),
                          role="ingress", uncaught=True)
        check_startup(settings)
    except (ValueError, InsecureStart) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_ingress(settings, stop=stop)

    asyncio.run(serve())
    return 0
