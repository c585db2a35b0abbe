"""Publishing one job's status events, in order, from the event loop or the training thread.

Every event is numbered and handed to the worker's status relay under one lock, so a job's events
enter the outbox (consumer/outbox.py), and leave it, in the order they were made, even when the
training thread emits while the loop publishes. Sequence numbers are allocated when an event is
made; an attempt's numbers start at ``attempt * ATTEMPT_STRIDE`` so a retried job keeps moving
its view forward (the view ignores any sequence it has passed).

Who waits for what (docs/bus.md): :meth:`JobStatusPublisher.send` waits for the broker's confirm
(the claim's STARTING, or CANCELLED, before the request is acked); :meth:`publish` and
:meth:`heartbeat` wait only until the event is on disk, so a broker outage never holds up a job's
handler; the relay sends it when it can.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any

from schemas import JobPhase, JobState, StatusEvent, TrainJob
from schemas.events import STICKY_FIELDS
from schemas.jobs import ATTEMPT_STRIDE
from schemas.tracing import continue_trace

from .status_relay import OutboxClosed, StatusRelay

log = logging.getLogger(__name__)


class JobStatusPublisher:
    def __init__(self, relay: StatusRelay, job: TrainJob, *, source: str, attempt: int = 0,
                 settle_timeout: float = 10.0) -> None:
        self.relay = relay
        self.job = job
        self.source = source
        # close() waits this long for the broker to confirm the job's events, then leaves them to
        # the relay: an outage must not keep the worker from its next job.
        self.settle_timeout = settle_timeout
        self._sequence = attempt * ATTEMPT_STRIDE
        # This attempt is one span of the submission's trace (a new trace for a job sent without
        # one); every event it makes carries that span.
        self.traceparent = str(continue_trace(job.traceparent))
        self._lock = threading.Lock()
        # STICKY_FIELDS are repeated on every event, so any event (heartbeats included) carries the
        # whole picture.
        self._sticky: dict[str, Any] = {}
        self.state = JobState.STARTING
        self.phase: JobPhase | None = None
        self._last_appended: concurrent.futures.Future[int] | None = None
        relay.start()

    def make(self, state: JobState, phase: JobPhase | None = None, **fields: Any) -> StatusEvent:
        """The next event, numbered, not sent yet (a claim writes it to the view first)."""
        with self._lock:
            return self._next_event(state, phase, fields)

    async def send(self, event: StatusEvent) -> None:
        """Send an event made by :meth:`make`, in order, and wait for the broker's confirm."""
        with self._lock:
            appended = self._append(event)
        await self.relay.sent(await asyncio.wrap_future(appended))

    async def publish(self, state: JobState, phase: JobPhase | None = None, **fields: Any) -> StatusEvent:
        """Make the next event and return once it is on disk in the outbox; the relay sends it."""
        event, appended = self._record(state, phase, fields)
        await asyncio.wrap_future(appended)
        return event

    def emit_threadsafe(self, state: JobState, phase: JobPhase | None = None, **fields: Any) -> None:
        """From the training thread: hand the event over and return at once (training never waits)."""
        try:
            self._record(state, phase, fields)
        except OutboxClosed as exc:
            log.warning("job %s: status event %s not recorded: %s", self.job.job_id, state.value, exc)

    def note(self, **fields: Any) -> None:
        """Remember values for the next event without sending one (e.g. the step count)."""
        with self._lock:
            self._remember(fields)

    async def heartbeat(self) -> None:
        """Re-state the current state: the watchdog reads liveness from the view's updated_at. An
        unsent beat of the job is replaced by this one (an outage leaves one beat, not thousands)."""
        if self.state.is_terminal:
            # The job has ended: a beat that raced the end would re-state it without its error
            # (error is not sticky) and with a newer sequence, erasing the reason from the view.
            return
        _, appended = self._record(self.state, self.phase, {}, heartbeat=True)
        await asyncio.wrap_future(appended)

    async def close(self) -> None:
        """Wait up to ``settle_timeout`` for the broker to confirm this job's events; whatever it
        has not confirmed by then stays in the outbox, and the relay goes on sending it."""
        if self._last_appended is None:
            return
        try:
            last_id = await asyncio.wrap_future(self._last_appended)
            await asyncio.wait_for(self.relay.sent(last_id), self.settle_timeout)
        except TimeoutError:
            log.warning("job %s: status events not confirmed within %.1f s; they stay in the outbox and go out "
                        "when the broker takes them", self.job.job_id, self.settle_timeout)
        except Exception as exc:  # noqa: BLE001 - the failed append was reported where it happened
            log.debug("job %s: last status event not recorded: %s", self.job.job_id, exc)

    def _record(self, state: JobState, phase: JobPhase | None, fields: dict[str, Any], *,
                heartbeat: bool = False) -> tuple[StatusEvent, concurrent.futures.Future[int]]:
        # Numbered and handed to the relay under one lock: the outbox holds the job's events in
        # sequence order, whichever thread made them.
        with self._lock:
            event = self._next_event(state, phase, fields)
            return event, self._append(event, heartbeat=heartbeat)

    def _append(self, event: StatusEvent, *, heartbeat: bool = False) -> concurrent.futures.Future[int]:
        self._last_appended = self.relay.submit(event, heartbeat=heartbeat)
        return self._last_appended

    def _next_event(self, state: JobState, phase: JobPhase | None, fields: dict[str, Any]) -> StatusEvent:
        self._sequence += 1
        self._remember(fields)
        self.state, self.phase = state, phase
        merged = {**self._sticky, **{k: v for k, v in fields.items() if v is not None}}
        return StatusEvent.for_job(
            self.job.job_id, self._sequence, state, source=self.source, phase=phase,
            request=self.job.request, submitted_at=self.job.submitted_at, job_source=self.job.source,
            trigger=self.job.trigger, traceparent=self.traceparent, **merged,
        )

    def _remember(self, fields: dict[str, Any]) -> None:
        self._sticky.update({k: v for k, v in fields.items() if k in STICKY_FIELDS and v is not None})
