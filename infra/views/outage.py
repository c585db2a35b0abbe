"""Waiting out an outage of the view store instead of failing the message that needed it.

A status event or dead letter that cannot be written because the store is down is not the
message's fault: failing it (a nack) would only burn its delivery limit and, after enough
tries, dead-letter an event that is perfectly good. The caller keeps its delivery unacked and
retries the same write with a growing pause; nothing beyond the consumer's prefetch is
delivered meanwhile, so the consumer has in effect stopped until the store is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from infra.backoff import RetryBackoff
from schemas import utc_now

log = logging.getLogger(__name__)

T = TypeVar("T")


class StoreOutage:
    """Runs view-store calls until they succeed, and knows whether the store is down.

    Every exception of a call counts as "the store is unreachable" (pymongo's
    ``ServerSelectionTimeoutError``, ``AutoReconnect``, ``ConnectionFailure``, an ``OSError``
    ...): the event being written has validated already, so the next one would meet the same
    store. One instance is shared by everything that writes the views for one process, so the
    outage is logged once (a warning when it starts, its duration when it ends) and
    :attr:`down_since` tells the watchdog to hold off.
    """

    def __init__(self, *, first_delay: float = 0.5, max_delay: float = 30.0) -> None:
        self.backoff = RetryBackoff(first_s=first_delay, max_s=max_delay)
        self.down_since: datetime | None = None  # None while the store answers
        self._down_at = 0.0  # monotonic, for the duration
        self._down_callbacks: list[Callable[[], None]] = []

    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def add_down_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` the moment an outage starts (e.g. to pause the watchdog)."""
        self._down_callbacks.append(callback)

    async def call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """``await operation()``, again and again with pauses (``first_delay`` doubling up to
        ``max_delay``) until it returns; ``what`` names it in the log. Cancellation ends it."""
        for delay in self.backoff.delays():
            try:
                result = await operation()
            except Exception as exc:  # noqa: BLE001 - any store failure means "down": see the class doc
                self._went_down(what, exc)
                log.debug("view store still down (%s: %s); retrying %s in %.1f s",
                          type(exc).__name__, exc, what, delay)
                await asyncio.sleep(delay)
                continue
            self._came_back()
            return result
        raise AssertionError("unreachable: the delays never end")

    def _went_down(self, what: str, exc: Exception) -> None:
        if self.down_since is not None:
            return
        self.down_since, self._down_at = utc_now(), time.monotonic()
        log.warning("view store unreachable (%s: %s) while trying to %s: consuming stops, the message is "
                    "held unacked and retried every %g..%g s until the store is back",
                    type(exc).__name__, exc, what, self.backoff.first_s, self.backoff.max_s)
        for callback in self._down_callbacks:
            callback()

    def _came_back(self) -> None:
        if self.down_since is None:
            return
        log.info("view store is back after %.1f s (down since %s); consuming again",
                 time.monotonic() - self._down_at, self.down_since.isoformat())
        self.down_since = None
