"""The watchdog re-queues jobs whose worker went silent, and gives up after max_attempts.

Runs on both buses (in-process and RabbitMQ) and both view stores (memory and nx-27017)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from schemas.jobs import ATTEMPT_HEADER, ATTEMPT_STRIDE
from consumer.watchdog import Watchdog
from infra.bus import Delivery, MessageBus
from infra.views import JobViewStore, Projector
from schemas import JobState, StatusEvent, TrainJob, TrainRequest, utc_now


def _events(job: TrainJob, attempt: int, age: timedelta) -> list[StatusEvent]:
    when = utc_now() - age
    base = attempt * ATTEMPT_STRIDE
    queued = StatusEvent.queued(job, source="/test/ingress")
    running = StatusEvent.for_job(job.job_id, base + 2, JobState.RUNNING, source="/test/worker", phase="training",
                                  epoch=3, epochs=10, time=when)
    starting = StatusEvent.for_job(job.job_id, base + 1, JobState.STARTING, source="/test/worker",
                                   phase="downloading", time=when)
    return [queued, starting, running]


async def _collect_requests(bus: MessageBus, into: list[tuple[TrainJob, dict[str, Any]]]):
    async def handle(job: TrainJob, delivery: Delivery) -> None:
        into.append((job, dict(delivery.headers)))

    return await bus.consume_requests(handle, model=TrainJob, prefetch=5)


async def test_silent_jobs_are_requeued_then_failed_and_live_ones_left_alone(bus: MessageBus,
                                                                             view_store: JobViewStore) -> None:
    projector = Projector(view_store)
    silent = TrainJob(request=TrainRequest(dataset_uri="s3://lake/a/", register_model=True))
    alive = TrainJob(request=TrainRequest(dataset_uri="s3://lake/b/"))
    for event in _events(silent, 0, timedelta(minutes=30)) + _events(alive, 0, timedelta(seconds=5)):
        await projector.handle(event)

    requeued: list[tuple[TrainJob, dict[str, Any]]] = []
    subscription = await _collect_requests(bus, requeued)
    watchdog = Watchdog(bus, view_store, stale_after=600, max_attempts=2)
    status_seen: list[StatusEvent] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        status_seen.append(event)
        await projector.handle(event)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    try:
        assert await watchdog.sweep() == [silent.job_id]
        for _ in range(100):
            if requeued and status_seen:
                break
            await asyncio.sleep(0.05)
        job, headers = requeued[0]
        assert job.job_id == silent.job_id and job.request == silent.request
        assert int(headers[ATTEMPT_HEADER]) == 1
        view = await view_store.get(silent.job_id)
        assert view.state == JobState.QUEUED and view.last_sequence == ATTEMPT_STRIDE
        assert "re-queued (attempt 2)" in view.error

        # The next attempt also goes silent: with max_attempts=2 the job fails with a reason.
        for event in _events(silent, 1, timedelta(minutes=30))[1:]:
            await projector.handle(event)
        assert await watchdog.sweep() == [silent.job_id]
        for _ in range(100):
            view = await view_store.get(silent.job_id)
            if view.state == JobState.FAILED:
                break
            await asyncio.sleep(0.05)
        assert view.state == JobState.FAILED and "stopped responding 2 times" in view.error
        assert len(requeued) == 1
        assert (await view_store.get(alive.job_id)).state == JobState.RUNNING
        assert await watchdog.sweep() == []
    finally:
        await watcher.close()
        await subscription.close()
