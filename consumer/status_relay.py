"""Sending a worker's status outbox (consumer/outbox.py) to the broker, for as long as it takes.

One relay per outbox (per worker process) sends the events in the order they were appended, one
at a time, each confirmed by the broker before it is removed; a job's events therefore arrive in
sequence order, and the outbox's global order is kept too. A publish that fails is retried
forever, with a capped exponential backoff: an outage delays events, it never drops one. A
process that dies between a confirm and the removal sends that event again at its next start
(same event id and sequence: the projector ignores what it has applied).

Every outbox call runs on one thread of the relay's (SQLite never blocks the event loop), in the
order submitted, so the order in which a publisher submits its events is the outbox's order.
The sender task runs while there is something to send and stops when the outbox is empty; the
next append (or :meth:`start`) starts it again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from infra.backoff import RetryBackoff
from infra.bus import BusUnavailable, MessageBus
from schemas import StatusEvent

from .outbox import OutboxEntry, StatusOutbox

log = logging.getLogger(__name__)

T = TypeVar("T")


class OutboxClosed(RuntimeError):
    """The relay was closed (the worker is exiting): no more events are taken."""


class StatusRelay:
    """The only sender of one outbox; see the module docstring."""

    def __init__(self, bus: MessageBus, outbox: StatusOutbox, *, backoff: RetryBackoff | None = None,
                 batch: int = 100) -> None:
        self.bus = bus
        self.outbox = outbox
        self.backoff = backoff or RetryBackoff()
        self._batch = batch
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="status-outbox")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender: asyncio.Task[None] | None = None
        self._appended_since_read = False
        # Every event with an id up to here is confirmed (or was replaced by a newer heartbeat).
        self._sent_through = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._closed = False

    # --- taking events ------------------------------------------------------------------------------
    def start(self) -> None:
        """Send what the outbox holds (events an earlier process left come first). On the loop."""
        self._loop = asyncio.get_running_loop()
        if not self._closed and (self._sender is None or self._sender.done()):
            self._sender = self._loop.create_task(self._send_until_empty(), name="status-relay")

    def submit(self, event: StatusEvent, *, heartbeat: bool = False) -> concurrent.futures.Future[int]:
        """Append ``event`` to the outbox (on the relay's thread; from any thread, after :meth:`start`).
        The future gives its outbox id once it is on disk."""
        if self._loop is None:
            raise RuntimeError("start() the status relay first")
        if self._closed:
            raise OutboxClosed("the status relay is closed")
        try:
            appended = self._io.submit(self.outbox.append, event, heartbeat=heartbeat)
        except RuntimeError:  # the I/O thread was shut down
            raise OutboxClosed("the status relay is closed") from None
        appended.add_done_callback(self._on_appended)
        return appended

    async def append(self, event: StatusEvent, *, heartbeat: bool = False) -> int:
        """Append ``event`` and return its id once it is on disk (not yet sent)."""
        return await asyncio.wrap_future(self.submit(event, heartbeat=heartbeat))

    async def sent(self, entry_id: int) -> None:
        """Wait until the broker confirmed event ``entry_id`` and everything before it."""
        if self._sent_through >= entry_id:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((entry_id, waiter))
        await waiter

    async def backlog(self) -> int:
        """Events in the outbox, not confirmed yet."""
        return await self._on_io_thread(self.outbox.count)

    # --- stopping -----------------------------------------------------------------------------------
    async def close(self, timeout: float) -> bool:
        """Give the outbox up to ``timeout`` s to empty, then stop: what is left stays on disk for
        the next process on this path. True when everything was sent. Idempotent."""
        if self._closed:
            return True
        self.start()
        newest = await self._on_io_thread(self.outbox.last_id)
        try:
            await asyncio.wait_for(self.sent(newest), timeout)
        except TimeoutError:
            pass
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        for _, waiter in self._waiters:  # a send() still waiting must not wait forever
            if not waiter.done():
                waiter.set_exception(OutboxClosed("the status relay closed before the broker confirmed the event"))
        self._waiters = []
        left = await self._on_io_thread(self.outbox.count)
        await self._on_io_thread(self.outbox.close)
        self._io.shutdown(wait=False)
        if left:
            log.warning("%d status events not sent yet: they stay in %s and go out when a worker starts on it",
                        left, self.outbox.path)
        return left == 0

    # --- sending ------------------------------------------------------------------------------------
    async def _send_until_empty(self) -> None:
        delays = self.backoff.delays()
        failures, failing_since = 0, 0.0
        while True:
            self._appended_since_read = False
            try:
                head, newest = await self._on_io_thread(self._read_head)
            except Exception:  # noqa: BLE001 - a disk hiccup: the sender must not die
                log.exception("cannot read the status outbox %s; retrying", self.outbox.path)
                await asyncio.sleep(next(delays))
                continue
            if not head:
                self._advance(newest)
                if not self._appended_since_read:  # no await since the check: nothing slips by
                    return
                continue
            for entry in head:
                try:
                    await self._publish(entry)
                except Exception as exc:  # noqa: BLE001 - whatever the cause, retry: never drop
                    failures += 1
                    failing_since = failing_since or time.monotonic()
                    delay = next(delays)
                    _log_failure(exc, failures, entry, delay)
                    await asyncio.sleep(delay)
                    break  # read the head again: a heartbeat there may have been replaced meanwhile
                if failures:
                    log.info("status events flowing again after %d failed attempts in %.1f s",
                             failures, time.monotonic() - failing_since)
                    failures, failing_since, delays = 0, 0.0, self.backoff.delays()
                await self._on_io_thread(self.outbox.remove, entry.id)
                self._advance(entry.id)

    async def _publish(self, entry: OutboxEntry) -> None:
        await self.bus.publish_status(entry.event, entry.event.routing_key, message_id=entry.event.id)

    def _read_head(self) -> tuple[list[OutboxEntry], int]:
        # One call on the I/O thread: every id up to ``newest`` was appended before this read.
        return self.outbox.pending(self._batch), self.outbox.last_id()

    def _advance(self, through: int) -> None:
        self._sent_through = max(self._sent_through, through)
        waiting = []
        for entry_id, waiter in self._waiters:
            if entry_id <= self._sent_through:
                if not waiter.done():
                    waiter.set_result(None)
            elif not waiter.done():
                waiting.append((entry_id, waiter))
        self._waiters = waiting

    def _on_appended(self, appended: concurrent.futures.Future[int]) -> None:
        # On the I/O thread. A failed append reaches its awaiting caller; one from the training
        # thread has none, so it is logged here.
        if appended.cancelled():
            return
        if appended.exception() is not None:
            log.error("a status event could not be written to the outbox %s: %s", self.outbox.path,
                      appended.exception())
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop closed: the process is exiting; the event is on disk
            pass

    def _wake(self) -> None:
        self._appended_since_read = True
        self.start()

    async def _on_io_thread(self, call: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, call, *args)


def _log_failure(exc: Exception, failures: int, entry: OutboxEntry, delay: float) -> None:
    # A long outage retries every max_s: say so at the start, then about every 10th attempt.
    if failures != 1 and failures % 10:
        return
    if isinstance(exc, BusUnavailable):
        log.warning("status event %s of job %s not published (%s; attempt %d); retrying in %.1f s, and for as "
                    "long as it takes", entry.event.sequence, entry.event.job_id, exc, failures, delay)
    else:
        log.error("status event %s of job %s not published (attempt %d); retrying in %.1f s", entry.event.sequence,
                  entry.event.job_id, failures, delay, exc_info=exc)
