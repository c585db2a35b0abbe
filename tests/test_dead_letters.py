"""Dead letters are answered (consumer/dead_letters.py), on both buses (in-process and RabbitMQ).

The test topology's request delivery limit is 2 (a poison request is delivered 3 times) and its
projector delivery limit 10 (a status event whose projection always fails: 11 times).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import BaseModel

from consumer.dead_letters import DeadLetters
from infra.bus import Delivery, MessageBus, Subscription
from infra.bus.base import DeadLetter
from infra.views import InMemoryJobViewStore, JobViewStore, Projector
from schemas import JobState, StatusEvent, TrainJob, TrainRequest
from schemas.jobs import ATTEMPT_HEADER, ATTEMPT_STRIDE
from tests.fixtures.rabbit import TEST_DELIVERY_LIMIT, ready_messages


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _answer_dead_letters(bus: MessageBus, views: JobViewStore) -> list[Subscription]:
    dead_letters = DeadLetters(bus, Projector(views), source="/test/dead-letters")
    return [await bus.consume_dead_requests(dead_letters.on_dead_request),
            await bus.consume_dead_status(dead_letters.on_dead_status)]


async def _crashing_worker(bus: MessageBus, deliveries: dict[str, list[int]]) -> Subscription:
    """A worker that crashes on every request before acking it: the broker retries, then dead-letters."""

    async def crash(job: TrainJob, delivery: Delivery) -> None:
        deliveries.setdefault(job.job_id, []).append(delivery.delivery_count)
        raise RuntimeError("worker crashed")

    return await bus.consume_requests(crash, model=TrainJob)


async def _failed_events(bus: MessageBus, into: list[StatusEvent]) -> Subscription:
    async def on_event(event: StatusEvent, _delivery: Any) -> None:
        if event.state == JobState.FAILED:
            into.append(event)

    return await bus.subscribe_status("job.#", on_event, model=StatusEvent)


async def _state_is(views: JobViewStore, job_id: str, state: JobState) -> bool:
    view = await views.get(job_id)
    return view is not None and view.state == state


async def _close(subscriptions: list[Subscription]) -> None:
    for subscription in subscriptions:
        await subscription.close()


async def test_a_dead_lettered_request_ends_its_queued_job_failed_with_the_reason(bus: MessageBus) -> None:
    """A QUEUED job, and one whose view the projector has not written yet: both end FAILED with a
    reason naming the fix, the second with its request; the FAILED events are published."""
    views = InMemoryJobViewStore()
    queued = TrainJob(request=TrainRequest(dataset_uri="s3://lake/queued/"))
    unseen = TrainJob(request=TrainRequest(dataset_uri="s3://lake/unseen/"))
    await Projector(views).handle(StatusEvent.queued(queued, source="/test/ingress"))
    deliveries: dict[str, list[int]] = {}
    failed: list[StatusEvent] = []
    subscriptions = [await _failed_events(bus, failed), await _crashing_worker(bus, deliveries),
                     *await _answer_dead_letters(bus, views)]
    try:
        for job in (queued, unseen):
            await bus.publish_request(job, message_id=job.job_id)
        for job in (queued, unseen):
            await _until(lambda: _state_is(views, job.job_id, JobState.FAILED), f"job {job.job_id} to fail")
        await _until(lambda: _has(failed, 2), "the FAILED events")
        tries = TEST_DELIVERY_LIMIT + 1
        for job in (queued, unseen):
            assert deliveries[job.job_id] == list(range(tries))
            view = await views.get(job.job_id)
            assert view.error == (f"the request was dead-lettered after {tries} deliveries (reason: delivery_limit): "
                                  "a worker crashed on it each time; check the worker logs, then submit the job again")
            assert view.last_sequence == ATTEMPT_STRIDE  # the next attempt's first number: above attempt 0
            assert view.request == job.request and view.submitted_at == job.submitted_at
        assert sorted(e.job_id for e in failed) == sorted([queued.job_id, unseen.job_id])
        assert await bus.drain_dead_requests() == []  # answered and acked
    finally:
        await _close(subscriptions)


async def _has(items: list[Any], count: int) -> bool:
    return len(items) >= count


async def test_a_dead_duplicate_of_a_finished_job_leaves_it_succeeded(bus: MessageBus,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="consumer.dead_letters")
    views = InMemoryJobViewStore()
    projector = Projector(views)
    done = TrainJob(request=TrainRequest(dataset_uri="s3://lake/done/"))
    await projector.handle(StatusEvent.queued(done, source="/test/ingress"))
    await projector.handle(StatusEvent.for_job(done.job_id, 5, JobState.SUCCEEDED, source="/test/worker",
                                               metrics={"f1": 0.8}))
    before = await views.get(done.job_id)
    failed: list[StatusEvent] = []
    subscriptions = [await _failed_events(bus, failed), await _crashing_worker(bus, {}),
                     *await _answer_dead_letters(bus, views)]
    try:
        await bus.publish_request(done, message_id=done.job_id)  # a late duplicate of its request

        async def ignored() -> bool:
            return any("already ended" in r.getMessage() and done.job_id in r.getMessage() for r in caplog.records)

        await _until(ignored, "the dead duplicate to be answered")
        await asyncio.sleep(0.3)  # a FAILED event would have arrived by now
        assert await views.get(done.job_id) == before
        assert failed == []
    finally:
        await _close(subscriptions)


class _NotAnEvent(BaseModel):
    note: str


async def test_a_dead_lettered_status_event_is_applied_and_an_invalid_one_dropped_and_logged(
        bus: MessageBus, caplog: pytest.LogCaptureFixture) -> None:
    """A projector that fails on every event (its writes, say): the event is dead-lettered after the
    projector's delivery limit and then applied from the dead-letter queue; a message that is not
    a status event, dead-lettered at once, is logged with its body (truncated) and dropped."""
    views = InMemoryJobViewStore()
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/events/"))
    await Projector(views).handle(StatusEvent.queued(job, source="/test/ingress"))
    projections: list[int] = []

    async def failing_projection(event: StatusEvent, delivery: Delivery) -> None:
        projections.append(delivery.delivery_count)
        raise RuntimeError("projection failed")

    subscriptions = [await bus.consume_projector(failing_projection, model=StatusEvent),
                     *await _answer_dead_letters(bus, views)]
    try:
        junk = _NotAnEvent(note="x" * 2000)
        await bus.publish_status(junk, f"job.{job.job_id}.running", message_id="junk-1")
        running = StatusEvent.for_job(job.job_id, 2, JobState.RUNNING, source="/test/worker", phase="training",
                                      epoch=1, epochs=3)
        await bus.publish_status(running, running.routing_key, message_id=running.id)

        await _until(lambda: _state_is(views, job.job_id, JobState.RUNNING), "the dead event to be applied")
        assert projections == list(range(bus.topology.projector_delivery_limit + 1))
        view = await views.get(job.job_id)
        assert view.last_sequence == 2 and view.epoch == 1
        dropped = [r.getMessage() for r in caplog.records
                   if r.name == "consumer.dead_letters" and "is not a status event; dropped" in r.getMessage()]
        assert len(dropped) == 1 and "junk-1" in dropped[0] and "reason: rejected" in dropped[0]
        size = len(junk.model_dump_json())
        assert '{"note":"xxx' in dropped[0] and f"... ({size} bytes)" in dropped[0]  # the body, truncated
        assert await ready_messages(bus, bus.topology.projector_dead_queue) == 0
    finally:
        await _close(subscriptions)


async def test_a_dead_copy_of_an_older_attempt_leaves_the_running_job_alone(bus: MessageBus) -> None:
    views = InMemoryJobViewStore()
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/x/"))
    await views.apply(StatusEvent.queued(job, source="/test/ingress"))
    # The watchdog re-queued it as attempt 3 (index 2), and a worker runs that one now.
    await views.apply(StatusEvent.for_job(job.job_id, 2 * ATTEMPT_STRIDE + 1, "running", source="/test/worker"))
    letters = DeadLetters(bus, Projector(views))
    old = DeadLetter(body=job.model_dump_json().encode(), message_id=job.job_id,
                     headers={ATTEMPT_HEADER: 0}, reason="delivery_limit", deliveries=2)
    await letters.on_dead_request(old, None)  # type: ignore[arg-type]
    assert (await views.get(job.job_id)).state is JobState.RUNNING
    current = DeadLetter(body=job.model_dump_json().encode(), message_id=job.job_id,
                         headers={ATTEMPT_HEADER: 2}, reason="delivery_limit", deliveries=2)
    await letters.on_dead_request(current, None)  # type: ignore[arg-type]
    view = await views.get(job.job_id)
    assert view.state is JobState.FAILED and "dead-lettered" in view.error
