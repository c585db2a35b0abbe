"""Accepting a job: the view created once, then the confirmed QUEUED event and request.

Order, and why:

1. **The view first** (``JobViewStore.create``, rule 10 of infra/views/merge.py): one
   conditional insert that only a missing view takes. Of two ingress replicas handed the same
   bucket event or idempotency key, one creates it and starts the job; the other answers
   "duplicate". A GET right after the 202 finds the job. The view store down: 503, nothing
   accepted.
2. **Then the QUEUED event and the request**, sent back to back on the bus's one publishing
   channel, their two confirms awaited together. The bus sends publishes in the order they were
   started and the broker routes one channel's messages in the order it got them, so a worker
   can only get the request after the QUEUED event was routed: every subscriber sees a job's
   events in order.
3. **Then the confirm is recorded** in the view (``accepted_attempt``, rule 11), after the 202:
   the write only spares the watchdog a republish, so many jobs' records share one write
   (ingress/acceptance.py). The ingress dying before it lands leaves a
   QUEUED view whose request may not be in the queue: after ``accept_grace`` the watchdog
   publishes it again (a copy that did arrive is refused by the worker's claim, rule 9).

If the bus fails (a confirm that never comes), the job is ended FAILED "not accepted" with a
compare-and-set on its QUEUED: then no copy the broker may have taken can run (a claim refuses an
ended job), and "not accepted, submit it again" is the truth, whichever of the two confirms
failed (the request is sent even when the QUEUED event's confirm is to fail). If instead the view
moved on, a worker already claimed the request: the job was accepted after all (202). A retry with
the same idempotency key starts the job's next attempt (events numbered from ``attempt * ATTEMPT_STRIDE``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from infra.bus.errors import BusUnavailable
from infra.keyed_locks import KeyedLocks
from ingress.acceptance import AcceptanceRecorder
from ingress.errors import IdempotencyConflict, LocationNotAllowed, Unavailable
from ingress.models import FieldProblem
from schemas.events import StatusEvent
from schemas.tracing import TraceParent
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
    attempt_of,
    new_job_id,
)

if TYPE_CHECKING:
    from infra.bus.base import MessageBus
    from infra.objects.allow_list import UriAllowList
    from infra.views.store import JobViewStore

log = logging.getLogger(__name__)
T = TypeVar("T")



@dataclass(frozen=True)
class Submission:
    job_id: str
    state: JobState
    created: bool  # False: an earlier job with the same idempotency key
    # The job's trace context (its submission's span); None only for a job older than traces.
    traceparent: str | None = None


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
                 allowed: UriAllowList | None = None) -> None:
        self.bus = bus
        self.views = views
        self.event_source = event_source
        self.allowed = allowed  # None: any location (the embedded one-machine mode)
        self._locks = KeyedLocks()
        self._acceptance = AcceptanceRecorder(views)  # confirms recorded after the 202

    async def submit(self, request: TrainRequest, *, source: JobSource = "api",
                     trigger: BucketTrigger | None = None, traceparent: str | None = None) -> Submission:
        """Accept ``request``. Raises LocationNotAllowed, Unavailable (nothing accepted) or
        IdempotencyConflict. ``traceparent``: this submission's span (schemas/tracing.py); a job
        submitted without one starts a trace of its own."""
        self._check_allowed(request)
        trace = traceparent or str(TraceParent.new())
        key = request.idempotency_key
        if key is None:
            return await self._accept(TrainJob(request=request, source=source, trigger=trigger, traceparent=trace))
        job_id = new_job_id(key)
        # Serialises this process's duplicates cheaply; across replicas the view's creation does.
        async with self._locks.hold(job_id):
            existing = await self._existing(job_id, key)
            if existing is None:
                return await self._accept(TrainJob(job_id=job_id, request=request, source=source, trigger=trigger,
                                                   traceparent=trace))
            if existing.request is not None and existing.request != request:
                raise IdempotencyConflict(key, existing.job_id)
            if not _not_accepted(existing):
                return Submission(existing.job_id, existing.state, created=False, traceparent=existing.traceparent)
            # The earlier try never reached the queue: this one is the job's next attempt, taken
            # with a compare-and-set so that of two replicas retrying it one does.
            job = TrainJob(job_id=job_id, request=request, source=source, trigger=trigger, traceparent=trace)
            return await self._accept(job, attempt_of(existing.last_sequence) + 1, replaces=existing.last_sequence)

    def _check_allowed(self, request: TrainRequest) -> None:
        if self.allowed is None:
            return
        problems = [FieldProblem(field=field, message=why, type="location_not_allowed")
                    for field, uri in (("dataset_uri", request.dataset_uri), ("config_uri", request.config_uri))
                    if uri is not None and (why := self.allowed.refusal(uri)) is not None]
        if problems:
            raise LocationNotAllowed("train request", problems)

    async def _existing(self, job_id: str, key: str) -> JobView | None:
        view = await self.views.call(self.views.store.get(job_id))
        if view is None:
            # Jobs whose id was not derived from the key (another producer) are found by key.
            view = await self.views.call(self.views.store.find_by_idempotency_key(key))
        return view

    async def _accept(self, job: TrainJob, attempt: int = 0, *, replaces: int | None = None) -> Submission:
        """The view first: creating it (or, for a retry, moving it on from ``replaces``) is what
        makes this submitter the one that starts the job (rules 10 and 7 of
        infra/views/merge.py). Then the QUEUED event and the request, both confirmed: a worker
        can only get the request after the QUEUED event was routed, so every subscriber sees a
        job's events in order. Then the view records the confirm (rule 11), after the answer."""
        queued = StatusEvent.queued(job, source=self.event_source, sequence=attempt * ATTEMPT_STRIDE)
        store = self.views.store
        write = store.create(queued) if replaces is None else store.apply(queued, expect_sequence=replaces)
        if not await self.views.call(write):
            view = await self.views.call(store.get(job.job_id))
            return Submission(job.job_id, view.state if view else JobState.QUEUED, created=False,
                              traceparent=view.traceparent if view else None)
        try:
            await self._publish_both(queued, job, attempt)
        except BusUnavailable as exc:
            if await self._record_not_accepted(queued, exc):
                raise Unavailable("message bus", f"{exc}; job {job.job_id} was not accepted",
                                  retry_after=exc.retry_after) from exc
            # A worker already took it: the broker had the request after all.
            log.info("job %s: its request was not confirmed, yet a worker claimed it", job.job_id)
        # Not awaited: until it lands, losing it costs only a republish that the claim refuses.
        self._acceptance.record(job.job_id, attempt)
        return Submission(job.job_id, JobState.QUEUED, created=True, traceparent=job.traceparent)

    async def _publish_both(self, queued: StatusEvent, job: TrainJob, attempt: int) -> None:
        """The QUEUED event, then the request, started in that order (the bus keeps it, see
        MessageBus) and confirmed together. Both are awaited to the end, so that a failure of
        either is handled only once the other's outcome is known."""
        results = await asyncio.gather(
            self._publish_event(queued),
            self.bus.publish_request(job, message_id=job.job_id, headers={ATTEMPT_HEADER: attempt}),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _record_not_accepted(self, queued: StatusEvent, exc: BusUnavailable) -> bool:
        """End the job FAILED "not accepted" unless it moved since its QUEUED (a worker claimed a
        request the broker took despite the failed confirm): True when the job was ended. A copy
        of the request that reaches a worker later is refused by its claim (the job ended)."""
        failed = StatusEvent.for_job(
            queued.job_id, queued.sequence + 1, JobState.FAILED, source=self.event_source,
            error=f"{NOT_ACCEPTED}: the message bus did not confirm the request ({exc}); nothing ran, "
                  "submit it again",
            traceparent=queued.traceparent,
        )
        try:
            ended = await self.views.call(self.views.store.apply(failed, expect_sequence=queued.sequence))
        except Unavailable as store_down:
            # Neither the bus nor the store answered: whether the job runs is not known.
            raise Unavailable("message bus and job view store", f"{exc}; {store_down}; job {queued.job_id} may "
                              f"still run: look at GET /train/{queued.job_id}, and retry only with the same "
                              "idempotency key", retry_after=exc.retry_after) from exc
        if ended:
            try:
                await self._publish_event(failed)
            except BusUnavailable:
                # Subscribers saw QUEUED at most; the view (written directly) says FAILED.
                log.warning("job %s: its FAILED (not accepted) event was not published", queued.job_id)
        return ended

    async def _publish_event(self, event: StatusEvent) -> None:
        # message_id = the event id: a redelivered or re-published event stays one event.
        await self.bus.publish_status(event, event.routing_key, message_id=event.id)

    async def close(self) -> None:
        """Wait for the confirms still being recorded (each write bounded by the store timeout)."""
        await self._acceptance.close()


def _not_accepted(view: JobView) -> bool:
    return view.state is JobState.FAILED and (view.error or "").startswith(NOT_ACCEPTED)
