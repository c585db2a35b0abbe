"""Retrying: a capped exponential backoff for the callers that retry without end (the worker's
status outbox, the projector during a view-store outage: an outage delays their work, it never
drops it), and :func:`retry_briefly` for those that give up after a few tries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class RetryBackoff(BaseModel):
    """Delays between attempts: ``first_s``, then times ``factor``, each at most ``max_s``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    first_s: float = Field(0.5, gt=0)
    max_s: float = Field(30.0, gt=0)
    factor: float = Field(2.0, ge=1)

    def delays(self) -> Iterator[float]:
        delay = self.first_s
        while True:
            yield min(delay, self.max_s)
            delay *= self.factor


async def retry_briefly(operation: Callable[[], Awaitable[T]], delays: tuple[float, ...],
                        on_retry: Callable[[Exception, float], None]) -> T:
    """``await operation()``; after a failure, ``on_retry(exc, delay)``, wait ``delay`` and try
    again, once per delay. The last failure is raised."""
    for delay in delays:
        try:
            return await operation()
        except Exception as exc:  # noqa: BLE001 - the caller decides what a failure means
            on_retry(exc, delay)
            await asyncio.sleep(delay)
    return await operation()
