"""Periodic liveness beats for a job that outlives any broker delivery (see docs/bus.md).

    async with heartbeat(lambda: bus.publish_status(beat_event(), key), interval=30):
        await train(...)

A beat that fails (broker briefly down) is logged and retried at the next interval: a missed
beat must not kill hours of training; the watchdog only acts on a *stale* job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def heartbeat(beat: Callable[[], Awaitable[Any]], interval: float) -> AsyncIterator[None]:
    if interval <= 0:
        raise ValueError("interval must be positive")

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await beat()
            except Exception as exc:  # noqa: BLE001 - keep beating whatever the cause
                log.warning("heartbeat failed (%s); retrying in %ss", exc, interval)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
