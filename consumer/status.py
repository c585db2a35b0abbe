"""Publishing one job's status events, in order, from the event loop or the training thread.

Every event goes through one queue and one sender task, so events leave in the order they were
made even when the training thread emits while the loop publishes. Sequence numbers are
allocated when an event is made; an attempt's numbers start at ``attempt * ATTEMPT_STRIDE`` so a
retried job keeps moving its view forward (the view ignores any sequence it has passed).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from infra.bus import BusUnavailable, MessageBus
from schemas import JobPhase, JobState, StatusEvent, TrainJob
from schemas.events import STICKY_FIELDS
from schemas.jobs import ATTEMPT_STRIDE

log = logging.getLogger(__name__)

@dataclass
class _Outgoing:
    event: StatusEvent
    done: asyncio.Future[None] | None = field(default=None)


class JobStatusPublisher:
    def __init__(self, bus: MessageBus, job: TrainJob, *, source: str, attempt: int = 0,
                 retry_delays: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30)) -> None:
        self.bus = bus
        self.job = job
        self.source = source
        self.retry_delays = retry_delays
        self._sequence = attempt * ATTEMPT_STRIDE
        self._lock = threading.Lock()
        # STICKY_FIELDS are repeated on every event, so any event (heartbeats included) carries the
        # whole picture.
        self._sticky: dict[str, Any] = {}
        self.state = JobState.STARTING
        self.phase: JobPhase | None = None
        self._queue: asyncio.Queue[_Outgoing | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._sender = asyncio.create_task(self._send_all(), name=f"status-{job.job_id}")

    def _make(self, state: JobState, phase: JobPhase | None, fields: dict[str, Any]) -> StatusEvent:
        with self._lock:
            self._sequence += 1
            self._remember(fields)
            self.state, self.phase = state, phase
            merged = {**self._sticky, **{k: v for k, v in fields.items() if v is not None}}
            return StatusEvent.for_job(
                self.job.job_id, self._sequence, state, source=self.source, phase=phase,
                request=self.job.request, submitted_at=self.job.submitted_at, job_source=self.job.source,
                trigger=self.job.trigger, **merged,
            )

    async def publish(self, state: JobState, phase: JobPhase | None = None, **fields: Any) -> StatusEvent:
        """Publish and wait for the broker's confirm (raises BusUnavailable if it never comes)."""
        event = self.make(state, phase, **fields)
        await self.send(event)
        return event

    def make(self, state: JobState, phase: JobPhase | None = None, **fields: Any) -> StatusEvent:
        """The next event, numbered, not sent yet (a claim writes it to the view first)."""
        return self._make(state, phase, fields)

    async def send(self, event: StatusEvent) -> None:
        """Publish an event made by :meth:`make`, in order, and wait for the broker's confirm."""
        outgoing = _Outgoing(event, self._loop.create_future())
        await self._queue.put(outgoing)
        await outgoing.done

    def emit_threadsafe(self, state: JobState, phase: JobPhase | None = None, **fields: Any) -> None:
        """From the training thread: queue the event and return at once (training never waits)."""
        outgoing = _Outgoing(self._make(state, phase, fields))
        self._loop.call_soon_threadsafe(self._queue.put_nowait, outgoing)

    def note(self, **fields: Any) -> None:
        """Remember values for the next event without sending one (e.g. the step count)."""
        with self._lock:
            self._remember(fields)

    def _remember(self, fields: dict[str, Any]) -> None:
        self._sticky.update({k: v for k, v in fields.items() if k in STICKY_FIELDS and v is not None})

    async def heartbeat(self) -> None:
        """Re-state the current state: the watchdog reads liveness from the view's updated_at."""
        if self.state.is_terminal:
            # The job has ended: a beat that raced the end would re-state it without its error
            # (error is not sticky) and with a newer sequence, erasing the reason from the view.
            return
        await self.publish(self.state, self.phase)

    async def _send_all(self) -> None:
        while (outgoing := await self._queue.get()) is not None:
            error: BaseException | None = None
            for delay in (*self.retry_delays, None):
                try:
                    await self.bus.publish_status(outgoing.event, outgoing.event.routing_key,
                                                  message_id=outgoing.event.id)
                    error = None
                    break
                except BusUnavailable as exc:
                    error = exc
                    if delay is None:
                        break
                    log.warning("status event for %s not published (%s); retrying in %ss",
                                self.job.job_id, exc, delay)
                    await asyncio.sleep(delay)
            if outgoing.done is not None and not outgoing.done.done():
                if error is None:
                    outgoing.done.set_result(None)
                else:
                    outgoing.done.set_exception(error)
            elif error is not None:
                log.error("dropped status event %s of %s: %s", outgoing.event.sequence, self.job.job_id, error)

    async def close(self) -> None:
        """Send what is queued, then stop."""
        await self._queue.put(None)
        await self._sender
