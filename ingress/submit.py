"""Accepting a job: idempotency check, confirmed publish, QUEUED event and view.

Order, and why:

1. **QUEUED first, confirmed**, on the status topic. If the broker does not confirm it, nothing
   was accepted: the caller answers 503 and a retry is clean.
2. **Then the request**, confirmed into the durable quorum queue, while the QUEUED event is also
   applied to the view store directly (write-through: a GET right after the 202 finds the job,
   and a duplicate bucket event is recognised before the projector has run). Because the worker
   can only see the request after the QUEUED event was routed, every subscriber sees a job's
   events in order, QUEUED first.
3. If the request is not confirmed, the job is recorded as FAILED "not accepted" (view and,
   when the bus allows, an event) and the caller gets 503. A retry with the same idempotency key
   starts the job's next attempt (its events numbered from ``attempt * ATTEMPT_STRIDE``).

Deduplication: a request with an idempotency key gets the job id ``new_job_id(key)``; a key
already in the view store answers with that job instead of publishing. Concurrent duplicates
in this process are serialised by a per-job lock. Replicas racing on the same key publish the
same job id twice: the two requests are the same attempt, and a worker trains only the one whose
claim wins in the job view (rule 9 of infra/views/merge.py); the other is acked and skipped.
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
from schemas.jobs import (
    ATTEMPT_HEADER,
    ATTEMPT_STRIDE,
    NOT_ACCEPTED,
    BucketTrigger,
    JobSource,
    JobState,
    JobView,
    TrainJob,
    TrainRequest,
    new_job_id,
)

if TYPE_CHECKING:
    from infra.bus.base import MessageBus
    from infra.views.store import JobViewStore

log = logging.getLogger(__name__)
T = TypeVar("T")



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

    async def submit(self, request: TrainRequest, *, source: JobSource = "api",
                     trigger: BucketTrigger | None = None) -> Submission:
        """Accept ``request``. Raises Unavailable (nothing accepted) or IdempotencyConflict."""
        key = request.idempotency_key
        if key is None:
            return await self._accept(TrainJob(request=request, source=source, trigger=trigger))
        job_id = new_job_id(key)
        async with self._locks.hold(job_id):
            existing = await self._existing(job_id, key)
            attempt = 0
            if existing is not None:
                if existing.request is not None and existing.request != request:
                    raise IdempotencyConflict(key, existing.job_id)
                if not _not_accepted(existing):
                    return Submission(existing.job_id, existing.state, created=False)
                # The earlier try never reached the queue: this one is the job's next attempt.
                attempt = existing.last_sequence // ATTEMPT_STRIDE + 1
            job = TrainJob(job_id=job_id, request=request, source=source, trigger=trigger)
            return await self._accept(job, attempt)

    async def _existing(self, job_id: str, key: str) -> JobView | None:
        view = await self.views.call(self.views.store.get(job_id))
        if view is None:
            # Jobs whose id was not derived from the key (another producer) are found by key.
            view = await self.views.call(self.views.store.find_by_idempotency_key(key))
        return view

    async def _accept(self, job: TrainJob, attempt: int = 0) -> Submission:
        """QUEUED first, then the request: the worker's events can only follow the QUEUED event,
        so every subscriber sees a job's events in order. A request the broker does not confirm
        is recorded as FAILED ("not accepted"); a retry with the same key runs it."""
        queued = StatusEvent.queued(job, source=self.event_source, sequence=attempt * ATTEMPT_STRIDE)
        try:
            await self._publish_event(queued)
        except BusUnavailable as exc:
            raise Unavailable("message bus", str(exc), retry_after=exc.retry_after) from exc
        view_written = asyncio.create_task(self._write_view(queued))
        try:
            await self.bus.publish_request(job, message_id=job.job_id, headers={ATTEMPT_HEADER: attempt})
        except BusUnavailable as exc:
            await view_written
            await self._record_not_accepted(queued, exc)
            raise Unavailable("message bus", str(exc), retry_after=exc.retry_after) from exc
        await view_written
        return Submission(job.job_id, JobState.QUEUED, created=True)

    async def _record_not_accepted(self, queued: StatusEvent, exc: BusUnavailable) -> None:
        failed = StatusEvent.for_job(
            queued.job_id, queued.sequence + 1, JobState.FAILED, source=self.event_source,
            error=f"{NOT_ACCEPTED}: the message bus did not confirm the request ({exc}); nothing ran, "
                  "submit it again",
        )
        await self._write_view(failed)
        try:
            await self._publish_event(failed)
        except BusUnavailable:
            # Subscribers saw QUEUED only; the view (written directly) says FAILED.
            log.warning("job %s: its FAILED (not accepted) event was not published", queued.job_id)

    async def _publish_event(self, event: StatusEvent) -> None:
        # message_id = the event id: a redelivered or re-published event stays one event.
        await self.bus.publish_status(event, event.routing_key, message_id=event.id,
                                      content_type=CLOUDEVENTS_CONTENT_TYPE)

    async def _write_view(self, event: StatusEvent) -> None:
        if not self.write_through:
            return
        try:
            await self.views.call(self.views.store.apply(event))
        except Unavailable as exc:
            # Not fatal: the projector applies the same event from the bus.
            log.warning("job %s: QUEUED view not written directly (%s); the projector will", event.job_id, exc)

    async def close(self) -> None:
        """Nothing runs in the background any more; kept for the app's shutdown hook."""


def _not_accepted(view: JobView) -> bool:
    return view.state is JobState.FAILED and (view.error or "").startswith(NOT_ACCEPTED)
