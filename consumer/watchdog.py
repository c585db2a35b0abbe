"""Re-queues jobs whose worker went silent, so an accepted job is never lost.

A claimed job (see consumer/worker.py) is no longer held by the broker; its worker proves it is
alive with a status event at least every heartbeat interval. A STARTING or RUNNING view that has
not moved for ``stale_after`` seconds lost its worker (crash, node gone): the watchdog publishes
the job again as a new attempt, or fails it after ``max_attempts``; a job whose cancel was
requested (DELETE /train/{id}) is ended CANCELLED instead of being run again.

``stale_after`` should be many heartbeat intervals: a worker cut off from the broker for longer
than that keeps training while the job is re-run elsewhere; the newer attempt's events win the
view (higher sequence numbers), and the older one's are ignored.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from infra.bus import MessageBus
from infra.views import JobViewStore
from schemas import JobState, JobView, StatusEvent, TrainJob, utc_now
from schemas.control import CANCELLED_BY_REQUEST
from schemas.jobs import ATTEMPT_HEADER, ATTEMPT_STRIDE


log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, bus: MessageBus, views: JobViewStore, *, stale_after: float = 600.0,
                 max_attempts: int = 3, source: str = "/cdtrain/watchdog") -> None:
        self.bus = bus
        self.views = views
        self.stale_after = stale_after
        self.max_attempts = max_attempts
        self.source = source

    async def stale_jobs(self) -> list[JobView]:
        deadline = utc_now() - timedelta(seconds=self.stale_after)
        stale: list[JobView] = []
        for state in (JobState.STARTING, JobState.RUNNING):
            cursor: str | None = None
            while True:
                views, cursor = await self.views.list(limit=200, cursor=cursor, state=state)
                stale += [v for v in views if v.updated_at < deadline]
                if cursor is None:
                    break
        return stale

    async def sweep(self) -> list[str]:
        """One pass; returns the ids of the jobs it re-queued or failed."""
        handled = []
        for view in await self.stale_jobs():
            if view.request is None:
                continue  # QUEUED never projected: nothing to re-publish from
            attempt = view.last_sequence // ATTEMPT_STRIDE + 1
            sequence = attempt * ATTEMPT_STRIDE
            if view.cancel_requested_at is not None:
                # A user cancelled it and then its worker went silent: end it, never run it again.
                event = StatusEvent.for_job(view.job_id, sequence, JobState.CANCELLED, source=self.source,
                                            phase=view.phase, error=view.cancel_reason or CANCELLED_BY_REQUEST)
                await self.bus.publish_status(event, event.routing_key, message_id=event.id)
            elif attempt >= self.max_attempts:
                reason = (f"the worker running this job stopped responding {attempt} times "
                          f"(no status for {self.stale_after:.0f} s); giving up")
                event = StatusEvent.for_job(view.job_id, sequence, JobState.FAILED, source=self.source,
                                            phase=view.phase, error=reason)
                await self.bus.publish_status(event, event.routing_key, message_id=event.id)
            else:
                job = TrainJob(job_id=view.job_id, request=view.request, submitted_at=view.submitted_at,
                               source=view.source or "api", trigger=view.trigger)
                # The request first: if the QUEUED event is lost, the job still runs.
                await self.bus.publish_request(job, message_id=job.job_id, headers={ATTEMPT_HEADER: attempt})
                event = StatusEvent.for_job(view.job_id, sequence, JobState.QUEUED, source=self.source,
                                            error=f"re-queued (attempt {attempt + 1}): its worker went silent")
                await self.bus.publish_status(event, event.routing_key, message_id=event.id)
            log.warning("job %s: %s", view.job_id, event.data.error)
            handled.append(view.job_id)
        return handled

    async def run(self, interval: float = 60.0) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next interval
                log.exception("watchdog sweep failed")
            await asyncio.sleep(interval)
