"""Re-queues jobs whose worker went silent, so an accepted job is never lost.

It also publishes again the request of a QUEUED job whose request's confirm was never recorded
(rule 11 of :mod:`infra.views.merge`: its submitter died between writing the view and
publishing) after ``accept_grace``, and, with ``volatile_queue`` (the embedded bus, whose queue
lives in memory), the request of every QUEUED job at start (:meth:`Watchdog.republish_unconfirmed`).

A claimed job (see consumer/worker.py) is no longer held by the broker; its worker proves it is
alive with a status event at least every heartbeat interval. A RUNNING job in phase ``training``
whose step has not moved for ``step_stall`` seconds (``step_at``, rule 8 of
:mod:`infra.views.merge`; a job whose trainer never reached a step counts from entering the
phase) is lost too, though its worker still beats: a hung training thread. Other phases
(downloading, evaluating, registering) make no steps and are judged by silence only; the
per-epoch validation pass runs inside ``training``, so ``step_stall`` must exceed the longest
validation pass. The hung worker is not told anything (its thread is stuck; a cancel would also
reach the new attempt, which reads the same view): it stays busy until someone restarts it, and
its late events carry the old attempt's sequence numbers, which the view ignores.

A STARTING or RUNNING view that has not moved for ``stale_after`` seconds lost its worker (crash, node gone): the watchdog publishes
the job again as a new attempt, or fails it after ``max_attempts``; a job whose cancel was
requested (DELETE /train/{id}) is ended CANCELLED instead of being run again.

``stale_after`` should be several heartbeat intervals (the defaults: 20 s beats, 120 s of silence,
a sweep every 30 s, so a lost worker is found within about 2.5 minutes). A worker that was only
cut off (from the broker) for longer than that is not lost for good either: the job's view moved
to the next attempt, and the worker stops at its next read of the view (consumer/ownership.py),
leaving the job to the attempt that resumes from its checkpoint.

Every job also has a deadline (``deadline_s`` of its request, else ``job_deadline`` from
``CDTRAIN_JOB_DEADLINE_S``, counted from submission): past it the job is ended FAILED, queued or
running, and its worker is stopped through the cancel path (:meth:`Watchdog.end_overdue`).

Silence is measured from ``heard_at``, the time the projector last projected an event of the job
(rule 6 of :mod:`infra.views.merge`), never from the event's own time; and :meth:`Watchdog.run`
sweeps only after ``caught_up`` is set, which :func:`consumer.roles.run_projector` does once the
projector queue has been seen empty with no event being projected, twice in a row
(``MessageBus.projector_backlog``: RabbitMQ's count of ready messages, the in-process queue's
length). After an outage of the projector, its first sweep so sees the heartbeats that waited in
the queue, instead of re-running every job that was alive all along. The same after an outage of
the view store: the projector holds the event it cannot write (consuming stops) and clears
``caught_up`` the moment the store fails, so the watchdog sweeps again only once the heartbeats
that piled up meanwhile are projected.

Two watchdogs (projector replicas) may judge the same view stale: each writes its decision (the
QUEUED/FAILED/CANCELLED event of the next attempt) to the view with a compare-and-set on the
``last_sequence`` it read (rule 7 of :mod:`infra.views.merge`) before publishing anything; only the
one whose write matched publishes the request and the event, so a job is re-queued once. A job
that spoke after it was read loses nothing: the write does not match, and it is not re-queued.
The cost of writing first: a watchdog that dies between its write and its publish leaves the view
QUEUED with no request in the queue (one confirmed publish later; not covered yet).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

from infra.bus import BusUnavailable, MessageBus
from infra.views import JobViewStore
from schemas import JobPhase, JobState, JobView, StatusEvent, TrainJob, utc_now
from schemas.control import CANCELLED_BY_REQUEST, CancelCommand
from schemas.jobs import ATTEMPT_HEADER, ATTEMPT_STRIDE, DEFAULT_DEADLINE_S, attempt_of
from schemas.topology import cancel_routing_key
from schemas.tracing import TraceParent


log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, bus: MessageBus, views: JobViewStore, *, stale_after: float = 120.0,
                 step_stall: float | None = 1800.0, max_attempts: int = 3,
                 job_deadline: float = DEFAULT_DEADLINE_S, accept_grace: float = 60.0,
                 volatile_queue: bool = False, source: str = "/cdtrain/watchdog") -> None:
        self.bus = bus
        self.views = views
        self.job_deadline = job_deadline
        # How long a QUEUED view may wait for its request's confirm to be recorded (rule 11 of
        # infra/views/merge.py) before the request is published again.
        self.accept_grace = accept_grace
        # The request queue lives in memory (the embedded bus): a start finds it empty, so the
        # first sweep publishes again the request of every job the views hold as queued.
        self.volatile_queue = volatile_queue
        self.stale_after = stale_after
        self.step_stall = step_stall
        self.max_attempts = max_attempts
        self.source = source

    def is_silent(self, view: JobView, now: datetime) -> bool:
        return (view.heard_at or view.updated_at) < now - timedelta(seconds=self.stale_after)

    def why_stale(self, view: JobView, now: datetime) -> str | None:
        """Why a STARTING/RUNNING view counts as lost, in words; None while it is fine."""
        if self.is_silent(view, now):
            return f"no status for {self.stale_after:g} s"
        if (self.step_stall is not None and view.state is JobState.RUNNING and view.phase is JobPhase.TRAINING
                and view.step_at is not None and view.step_at < now - timedelta(seconds=self.step_stall)):
            at = f"at step {view.step}" if view.step is not None else "before its first step"
            return f"no training step for {self.step_stall:g} s ({at}) though its worker still reports"
        return None

    async def _views_in(self, *states: JobState) -> AsyncIterator[JobView]:
        """Every view in these states, page by page."""
        for state in states:
            cursor: str | None = None
            while True:
                views, cursor = await self.views.list(limit=200, cursor=cursor, state=state)
                for view in views:
                    yield view
                if cursor is None:
                    break

    async def stale_jobs(self, now: datetime) -> list[tuple[JobView, str]]:
        return [(v, why) async for v in self._views_in(JobState.STARTING, JobState.RUNNING)
                if (why := self.why_stale(v, now)) is not None]

    def deadline_of(self, view: JobView) -> float:
        if view.request is not None and view.request.deadline_s is not None:
            return float(view.request.deadline_s)
        return self.job_deadline

    async def overdue_jobs(self, now: datetime) -> list[JobView]:
        return [v async for v in self._views_in(JobState.QUEUED, JobState.STARTING, JobState.RUNNING)
                if v.submitted_at + timedelta(seconds=self.deadline_of(v)) < now]

    async def end_overdue(self) -> list[str]:
        """Fail every job past its deadline, queued or running, and tell its worker to stop.

        In this order: (1) the cancel request in the view (rule 5 of :mod:`infra.views.merge`:
        refused once the job ended, so before the FAILED), which a worker that claims the job
        later, or that lost the command, reads (consumer/cancellation.py); (2) FAILED with the
        deadline reason at the next attempt's first sequence number, written to the view by
        this watchdog: of two watchdogs only the first write advances it (rule 1), and that one
        alone publishes; the stopping worker's own CANCELLED comes with a lower sequence
        number, so the view stays FAILED; (3) the FAILED event; (4) the cancel command, so a
        running worker stops at its next step (lost: at its next heartbeat, from the view).
        """
        now = utc_now()
        ended = []
        for view in await self.overdue_jobs(now):
            deadline = self.deadline_of(view)
            passed = (view.submitted_at + timedelta(seconds=deadline)).strftime("%Y-%m-%d %H:%M:%SZ")
            if view.request is not None and view.request.deadline_s is not None:
                advice = "submit it again with a larger deadline_s"
            else:
                advice = ("set deadline_s on the train request (the server's default, CDTRAIN_JOB_DEADLINE_S, "
                          "applied)")
            reason = f"deadline of {deadline:g} s passed at {passed}; {advice}"
            await self.views.request_cancel(view.job_id, now, reason)
            sequence = (view.last_sequence // ATTEMPT_STRIDE + 1) * ATTEMPT_STRIDE
            event = StatusEvent.for_job(view.job_id, sequence, JobState.FAILED, source=self.source,
                                        phase=view.phase, error=reason, traceparent=_span(view))
            if not await self.views.apply(event):
                continue  # another watchdog (or a newer attempt) got there first
            await self.bus.publish_status(event, event.routing_key, message_id=event.id)
            # Queued jobs too: a worker may have claimed it since the view was read.
            command = CancelCommand(job_id=view.job_id, requested_at=now, reason=reason)
            try:
                await self.bus.publish_control(command, cancel_routing_key(view.job_id))
            except BusUnavailable as exc:  # the view holds the request: the worker reads it
                log.warning("job %s: stop command not confirmed (%s)", view.job_id, exc)
            log.warning("job %s: %s", view.job_id, reason)
            ended.append(view.job_id)
        return ended

    async def sweep(self) -> list[str]:
        """One pass; returns the ids of the jobs it re-queued, re-published or failed."""
        handled = await self.end_overdue()
        handled += await self.republish_unconfirmed()
        now = utc_now()
        for view, why in await self.stale_jobs(now):
            if view.job_id in handled or view.request is None:
                continue  # ended just now; or QUEUED never projected: nothing to re-publish from
            attempt = view.last_sequence // ATTEMPT_STRIDE + 1
            event, job = self._decide(view, why, attempt, silent=self.is_silent(view, now))
            if not await self._claim(view, event):
                continue
            if job is not None:  # the request before the event: if the QUEUED event is lost, the job still runs
                await self.bus.publish_request(job, message_id=job.job_id, headers={ATTEMPT_HEADER: attempt})
            await self.bus.publish_status(event, event.routing_key, message_id=event.id)
            if job is not None:
                await self.views.mark_accepted(job.job_id, attempt)
            log.warning("job %s: %s", view.job_id, event.data.error)
            handled.append(view.job_id)
        return handled

    async def unconfirmed_jobs(self, now: datetime, *, every_queued: bool = False) -> list[JobView]:
        """QUEUED views whose request's confirm was never recorded for their attempt (rule 11),
        for longer than ``accept_grace``; with ``every_queued``, every QUEUED view."""
        grace = now - timedelta(seconds=self.accept_grace)
        return [v async for v in self._views_in(JobState.QUEUED) if v.request is not None and (every_queued or (
            (v.accepted_attempt is None or v.accepted_attempt < attempt_of(v.last_sequence))
            and (v.heard_at or v.updated_at) < grace))]

    async def republish_unconfirmed(self, *, every_queued: bool = False) -> list[str]:
        """Publish again the request of each QUEUED job whose request may not be in the queue
        (its submitter, or a watchdog, died between its view write and its confirm), and record
        it. A copy that was in the queue after all is refused by the worker's claim (rule 9):
        publishing twice is safe, losing the job is not. ``every_queued``: the embedded mode's
        queue lived in memory, so after a restart every queued job's request is gone."""
        republished = []
        for view in await self.unconfirmed_jobs(utc_now(), every_queued=every_queued):
            attempt = attempt_of(view.last_sequence)
            job = _job_of(view)
            await self.bus.publish_request(job, message_id=job.job_id, headers={ATTEMPT_HEADER: attempt})
            await self.views.mark_accepted(job.job_id, attempt)
            log.warning("job %s: its request (attempt %d) was published again: %s", job.job_id, attempt + 1,
                        "the service restarted with an in-memory queue" if every_queued
                        else "its confirm was never recorded")
            republished.append(job.job_id)
        return republished

    def _decide(self, view: JobView, why: str, attempt: int, *, silent: bool) -> tuple[StatusEvent, TrainJob | None]:
        """What to do with a stale job: its next attempt's event, and the request to re-queue (if any)."""
        sequence = attempt * ATTEMPT_STRIDE
        if view.cancel_requested_at is not None:
            # A user cancelled it and then its worker went silent: end it, never run it again.
            return StatusEvent.for_job(view.job_id, sequence, JobState.CANCELLED, source=self.source,
                                       phase=view.phase, error=view.cancel_reason or CANCELLED_BY_REQUEST,
                                       traceparent=_span(view)), None
        if attempt >= self.max_attempts:
            reason = (f"the worker running this job stopped responding {attempt} times "
                      f"(no status for {self.stale_after:g} s); giving up" if silent else
                      f"giving up after {attempt} attempts: the last made {why}")
            return StatusEvent.for_job(view.job_id, sequence, JobState.FAILED, source=self.source,
                                       phase=view.phase, error=reason, traceparent=_span(view)), None
        job = _job_of(view)
        event = StatusEvent.for_job(view.job_id, sequence, JobState.QUEUED, source=self.source,
                                    traceparent=_span(view),
                                    error=f"re-queued (attempt {attempt + 1}): " + (
                                        "its worker went silent" if silent else f"it made {why}"))
        return event, job

    async def _claim(self, view: JobView, event: StatusEvent) -> bool:
        """The compare-and-set that makes this watchdog the only one acting on this attempt."""
        if await self.views.apply(event, expect_sequence=view.last_sequence):
            return True
        log.info("job %s: not %s by this watchdog: its view moved on since it was read (another watchdog, "
                 "or the job spoke)", view.job_id, event.data.state.value)
        return False

    async def run(self, interval: float = 60.0, caught_up: asyncio.Event | None = None,
                  gate: Callable[[], str | None] | None = None) -> None:
        """Sweep every ``interval`` seconds; with ``caught_up``, only while it is set: the projector
        clears it when the view store goes down, and sets it again once the events that piled up
        meanwhile are projected, so an outage never makes a live job look silent. ``gate`` says
        why not to sweep now (consumer/sweep_gate.py: the projector behind, the broker just back)."""
        restarted = self.volatile_queue
        held: str | None = None
        while True:
            if caught_up is not None and not caught_up.is_set():
                log.info("watchdog waits for the projector to catch up with its queue")
                await caught_up.wait()
            reason = gate() if gate is not None else None
            if reason is not None:
                if reason.split(":")[0] != (held or "").split(":")[0]:
                    log.info("watchdog holds its sweep: %s", reason)
                held = reason
                await asyncio.sleep(interval)
                continue
            held = None
            try:
                if restarted:
                    await self.republish_unconfirmed(every_queued=True)
                    restarted = False
                await self.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next interval
                log.exception("watchdog sweep failed")
            await asyncio.sleep(interval)


def _job_of(view: JobView) -> TrainJob:
    """The request of a job, rebuilt from its view to be published again: the same submission,
    in the same trace (the worker that takes it continues the submission's span)."""
    return TrainJob(job_id=view.job_id, request=view.request, submitted_at=view.submitted_at,
                    source=view.source or "api", trigger=view.trigger, traceparent=view.traceparent)


def _span(view: JobView) -> str | None:
    """A span of the job's trace for an event this watchdog makes (None: the job has no trace)."""
    parent = TraceParent.parse(view.traceparent)
    return None if parent is None else str(parent.child())
