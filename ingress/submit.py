"""Accepting a job: idempotency check, confirmed publish, QUEUED event and view.

Order, and why:

1. **Request first, confirmed.** ``publish_request`` returns only once RabbitMQ has confirmed the
   request into the durable quorum queue. If it fails, nothing has been written anywhere, so
   the caller answers 503 and a retry is clean.
2. **Then QUEUED (sequence 0)**, published to the status topic and, with write-through on,
   applied to the view store directly, concurrently. A GET right after the 202 then finds the
   job, and a duplicate bucket event is recognised before the projector has run. The
   projector applying the same event later is a no-op.
3. If QUEUED cannot be published after the request was confirmed, the job is still accepted
   (it is durable in the queue and will run); the event is retried in the background, and the
   view store merges a QUEUED that arrives after the worker's own events (infra/views/merge.py).

Deduplication: a request with an idempotency key gets the job id ``new_job_id(key)``; a key
already in the view store answers with that job instead of publishing. Concurrent duplicates
in this process are serialised by a per-job lock. Replicas racing on the same key publish the
same job id twice, and the worker skips a job id it has already seen (docs/bus.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from infra.bus.errors import BusUnavailable
from ingress.errors import IdempotencyConflict, Unavailable
from schemas.events import CLOUDEVENTS_CONTENT_TYPE, StatusEvent
from schemas.jobs import BucketTrigger, JobSource, JobState, JobView, TrainJob, TrainRequest, new_job_id

if TYPE_CHECKING:
    from infra.bus.base import MessageBus
    from infra.views.store import JobViewStore

log = logging.getLogger(__name__)
T = TypeVar("T")

_QUEUED_RETRIES = 20  # x retry_after: a few minutes of broker trouble, then give up (logged)


@dataclass(frozen=True)
class Submission:
    job_id: str
    state: JobState
    created: bool  # False: an earlier job with the same idempotency key


class KeyedLock:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


class ViewReader:
    """View-store calls bounded in time; any failure becomes :class:`Unavailable`."""

    def __init__(self, store: JobViewStore, *, timeout_s: float, retry_after_s: float) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s

    async def call(self, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await awaitable
        except ValueError:
            raise  # the caller's mistake (InvalidCursor, bad limit), not an outage
        except TimeoutError:
            raise Unavailable("job view store", f"no answer within {self.timeout_s:g} s",
                              retry_after=self.retry_after_s) from None
        except Exception as exc:  # noqa: BLE001 - driver errors differ per backend
            raise Unavailable("job view store", f"{type(exc).__name__}: {exc}",
                              retry_after=self.retry_after_s) from exc


class Submitter:
    def __init__(self, bus: MessageBus, views: ViewReader, *, event_source: str,
                 write_through: bool = True) -> None:
        self.bus = bus
        self.views = views
        self.event_source = event_source
        self.write_through = write_through
        self._locks = KeyedLock()
        self._retries: set[asyncio.Task[None]] = set()

    async def submit(self, request: TrainRequest, *, source: JobSource = "api",
                     trigger: BucketTrigger | None = None) -> Submission:
        """Accept ``request``. Raises Unavailable (nothing accepted) or IdempotencyConflict."""
        key = request.idempotency_key
        if key is None:
            return await self._accept(TrainJob(request=request, source=source, trigger=trigger))
        job_id = new_job_id(key)
        async with self._locks.hold(job_id):
            existing = await self._existing(job_id, key)
            if existing is not None:
                if existing.request is not None and existing.request != request:
                    raise IdempotencyConflict(key, existing.job_id)
                return Submission(existing.job_id, existing.state, created=False)
            return await self._accept(TrainJob(job_id=job_id, request=request, source=source, trigger=trigger))

    async def _existing(self, job_id: str, key: str) -> JobView | None:
        view = await self.views.call(self.views.store.get(job_id))
        if view is None:
            # Jobs whose id was not derived from the key (another producer) are found by key.
            view = await self.views.call(self.views.store.find_by_idempotency_key(key))
        return view

    async def _accept(self, job: TrainJob) -> Submission:
        try:
            await self.bus.publish_request(job, message_id=job.job_id)
        except BusUnavailable as exc:
            raise Unavailable("message bus", str(exc), retry_after=exc.retry_after) from exc
        event = StatusEvent.queued(job, source=self.event_source)
        await asyncio.gather(self._publish_queued(event), self._write_view(event))
        return Submission(job.job_id, JobState.QUEUED, created=True)

    async def _publish_queued(self, event: StatusEvent) -> None:
        try:
            await self._publish_event(event)
        except BusUnavailable as exc:
            log.warning("job %s is queued but its QUEUED event was not confirmed (%s); retrying "
                        "in the background", event.job_id, exc)
            task = asyncio.create_task(self._retry_queued(event, exc.retry_after))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _publish_event(self, event: StatusEvent) -> None:
        # message_id = the event id: a redelivered or re-published event stays one event.
        await self.bus.publish_status(event, event.routing_key, message_id=event.id,
                                      content_type=CLOUDEVENTS_CONTENT_TYPE)

    async def _retry_queued(self, event: StatusEvent, delay: float) -> None:
        for _ in range(_QUEUED_RETRIES):
            await asyncio.sleep(delay)
            try:
                await self._publish_event(event)
                log.info("QUEUED event of job %s published on retry", event.job_id)
                return
            except BusUnavailable as exc:
                delay = exc.retry_after
        log.error("gave up publishing the QUEUED event of job %s; its view will show the job "
                  "from the worker's events on", event.job_id)

    async def _write_view(self, event: StatusEvent) -> None:
        if not self.write_through:
            return
        try:
            await self.views.call(self.views.store.apply(event))
        except Unavailable as exc:
            # Not fatal: the projector applies the same event from the bus.
            log.warning("job %s: QUEUED view not written directly (%s); the projector will", event.job_id, exc)

    @property
    def pending_retries(self) -> int:
        return len(self._retries)

    async def close(self) -> None:
        tasks = list(self._retries)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
