"""Answers the dead-letter queues, so that nothing dead-lettered is silently lost (projector role).

- A dead train request (a worker crashed on it ``delivery_limit + 1`` times, or could not read
  it) would leave its job QUEUED for ever: its view is ended FAILED with a reason a person can
  act on, and the FAILED event is published. The write is a claim (rule 9 of
  :mod:`infra.views.merge`) at the next attempt's first sequence number, so it outranks the
  job's own events but leaves a job that already ended alone (a dead duplicate of a finished
  job). A job without a view gets one, FAILED, holding the request.
- A dead status event (its projection failed too often) is applied to the views: the merge
  rules ignore it if it is stale. A message that is not a status event is logged and dropped.

Writes to the views wait out a store outage (:class:`~infra.views.outage.StoreOutage`, shared
with the projector) with the dead letter held unacked, as the projector does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infra.bus import BusError, DeadLetter, Delivery, MessageBus
from infra.views import Projector
from schemas import JobState, JobView, StatusEvent, TrainJob
from schemas.jobs import ATTEMPT_HEADER, ATTEMPT_STRIDE, JOB_ID_PATTERN, attempt_of
from schemas.tracing import TraceParent

log = logging.getLogger(__name__)

T = TypeVar("T")


class _JobRef(BaseModel):
    """What can still be read from a request that is not a valid TrainJob: whose it is."""

    model_config = ConfigDict(extra="ignore")

    job_id: str = Field(pattern=JOB_ID_PATTERN)


def last_attempt_of(letter: DeadLetter) -> int:
    """The newest attempt this request's deliveries could have claimed: a worker numbers its
    attempt as the request's attempt header plus the delivery count (consumer/worker.py)."""
    return int(letter.headers.get(ATTEMPT_HEADER, 0)) + max((letter.deliveries or 1) - 1, 0)


def why_dead(letter: DeadLetter) -> str:
    """The FAILED reason of a job whose request was dead-lettered, naming what to do."""
    after = f" after {letter.deliveries} deliveries" if letter.deliveries else ""
    said = f"the request was dead-lettered{after} (reason: {letter.reason})"
    if letter.reason == "rejected":
        return (f"{said}: a worker could not read it as a train request; check that the ingress and the "
                "workers run the same version, then submit the job again")
    if letter.reason == "delivery_limit":
        return f"{said}: a worker crashed on it each time; check the worker logs, then submit the job again"
    return f"{said}; check the worker logs, then submit the job again"


class DeadLetters:
    """Handlers for ``MessageBus.consume_dead_requests`` and ``consume_dead_status``."""

    def __init__(self, bus: MessageBus, projector: Projector, *, source: str = "/cdtrain/dead-letters",
                 body_preview: int = 500) -> None:
        self.bus = bus
        self.projector = projector  # its store and its outage guard: one view of "the store is down"
        self.source = source
        self.body_preview = body_preview

    async def on_dead_request(self, letter: DeadLetter, _delivery: Delivery) -> None:
        job, job_id = self._read_request(letter)
        if job_id is None:
            log.error("dead-lettered request %s (reason: %s) names no job; dropped: %s",
                      letter.message_id, letter.reason, self._preview(letter.body))
            return
        while True:
            view = await self._store(f"read the view of job {job_id}", lambda: self.projector.store.get(job_id))
            if view is None and job is None:
                log.error("dead-lettered request %s of unknown job %s (reason: %s) is not a train request; "
                          "dropped: %s", letter.message_id, job_id, letter.reason, self._preview(letter.body))
                return
            if view is not None and view.state.is_terminal:
                log.info("dead-lettered request of job %s (reason: %s) ignored: the job already ended (%s)",
                         job_id, letter.reason, view.state.value)
                return
            if view is not None and attempt_of(view.last_sequence) > last_attempt_of(letter):
                # A copy of an older attempt: a newer one (the watchdog's re-queue) runs the job.
                log.info("dead-lettered request of job %s (reason: %s) ignored: attempt %d holds the job",
                         job_id, letter.reason, attempt_of(view.last_sequence) + 1)
                return
            event = self._failed_event(job_id, view, job, why_dead(letter))
            if await self._store(f"end job {job_id} FAILED", lambda: self.projector.store.claim(event)):
                break
            # Refused: the job ended, or moved to a later attempt, since it was read. Judge it again.
        log.warning("job %s: %s", job_id, event.data.error)
        try:
            await self.bus.publish_status(event, event.routing_key, message_id=event.id)
        except BusError as exc:  # the view holds the outcome; a follower re-reads it after a gap
            log.warning("job %s: FAILED written to its view but not published (%s)", job_id, exc)

    async def on_dead_status(self, letter: DeadLetter, _delivery: Delivery) -> None:
        try:
            event = StatusEvent.model_validate_json(letter.body)
        except ValidationError as exc:
            log.error("dead-lettered status message %s (reason: %s) is not a status event; dropped: %s (%s)",
                      letter.message_id, letter.reason, self._preview(letter.body), _first_error(exc))
            return
        advanced = await self.projector.handle(event)
        log.warning("dead-lettered status event %s of job %s (%s, reason: %s) %s", event.id, event.job_id,
                    event.state.value, letter.reason,
                    "applied to its view" if advanced else "was already in its view (or is stale)")

    def _failed_event(self, job_id: str, view: JobView | None, job: TrainJob | None, reason: str) -> StatusEvent:
        # The next attempt's first number outranks every event of the job so far (as the
        # watchdog's deadline does); the claim still refuses a job that ended.
        last = view.last_sequence if view is not None else 0
        sequence = (last // ATTEMPT_STRIDE + 1) * ATTEMPT_STRIDE
        submission = {}
        if job is not None and (view is None or view.request is None):  # the view needs its request
            submission = dict(request=job.request, submitted_at=job.submitted_at, job_source=job.source,
                              trigger=job.trigger)
        # In the submission's trace, as the job's other events are.
        trace = TraceParent.parse((job.traceparent if job is not None else None)
                                  or (view.traceparent if view is not None else None))
        return StatusEvent.for_job(job_id, sequence, JobState.FAILED, source=self.source,
                                   phase=view.phase if view is not None else None, error=reason,
                                   traceparent=trace.child() if trace is not None else None, **submission)

    @staticmethod
    def _read_request(letter: DeadLetter) -> tuple[TrainJob | None, str | None]:
        try:
            job = TrainJob.model_validate_json(letter.body)
            return job, job.job_id
        except ValidationError:
            pass
        try:
            return None, _JobRef.model_validate_json(letter.body).job_id
        except ValidationError:
            return None, None

    async def _store(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        return await self.projector.outage.call(what, operation)

    def _preview(self, body: bytes) -> str:
        if len(body) <= self.body_preview:
            return repr(body)
        return f"{body[:self.body_preview]!r}... ({len(body)} bytes)"


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    return f"{len(errors)} validation error(s), first: {errors[0]['msg']}" if errors else str(exc)
