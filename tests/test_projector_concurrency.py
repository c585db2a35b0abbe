"""The projector writes many jobs at once and each job's events in order (infra/views/projector.py).

On both buses and both view stores: events of many jobs, published interleaved and each job's in
sequence order, are consumed with a prefetch above 1. Every view must end at its job's last
event; no event may reach the store stale (one job's writes in delivery order); writes of
different jobs must overlap (otherwise the prefetch bought nothing); and never two of one job.
And a projector that dies with a prefetch of events in hand loses none of them to the next one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from infra.keyed_locks import KeyedLocks
from infra.views import JobViewStore, Projector
from schemas import JobState, StatusEvent, event_source
from tests.fixtures.rabbit import BusFactory

WORKER = event_source("worker", "gpu-0")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


async def test_one_key_runs_one_holder_at_a_time_in_arrival_order_and_other_keys_do_not_wait() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    a_entered = asyncio.Event()
    release_a = asyncio.Event()

    async def first() -> None:
        async with locks.hold("job-a"):
            order.append("a1")
            a_entered.set()
            await release_a.wait()

    async def later(tag: str, key: str) -> None:
        async with locks.hold(key):
            order.append(tag)

    holder = asyncio.create_task(first())
    await a_entered.wait()
    waiters = [asyncio.create_task(later(f"a{i}", "job-a")) for i in range(2, 6)]
    await asyncio.wait_for(later("b1", "job-b"), 1)  # another key goes by while job-a is held
    assert order == ["a1", "b1"]
    assert len(locks) == 1  # job-b's lock is gone once it was left
    release_a.set()
    await asyncio.gather(holder, *waiters)
    assert order == ["a1", "b1", "a2", "a3", "a4", "a5"]
    assert len(locks) == 0


async def test_a_holder_that_fails_or_is_cancelled_releases_its_key() -> None:
    locks = KeyedLocks()

    async def fail() -> None:
        async with locks.hold("k"):
            raise RuntimeError("the write failed")

    with pytest.raises(RuntimeError):
        await fail()
    blocked = asyncio.Event()

    async def hang() -> None:
        async with locks.hold("k"):
            blocked.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hang())
    await blocked.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    async with asyncio.timeout(1):
        async with locks.hold("k"):
            pass
    assert len(locks) == 0


class _Watched:
    """A view store that counts writes in progress, overall and per job."""

    def __init__(self, store: JobViewStore) -> None:
        self.store = store
        self.now = 0
        self.peak = 0
        self.per_job: Counter[str] = Counter()
        self.per_job_peak = 0

    async def apply(self, event: StatusEvent, **kw: Any) -> bool:
        self.now += 1
        self.per_job[event.job_id] += 1
        self.peak = max(self.peak, self.now)
        self.per_job_peak = max(self.per_job_peak, self.per_job[event.job_id])
        try:
            await asyncio.sleep(0.002)  # a store round trip, so that writes can overlap even in memory
            return await self.store.apply(event, **kw)
        finally:
            self.now -= 1
            self.per_job[event.job_id] -= 1


def _events(jobs: int, per_job: int) -> list[StatusEvent]:
    """Round robin over the jobs; each job's sequence 1..per_job in order, its last one SUCCEEDED."""
    out = []
    for seq in range(1, per_job + 1):
        for j in range(jobs):
            state = "succeeded" if seq == per_job else "running"
            out.append(StatusEvent.for_job(f"job-{j:03d}", seq, state, source=WORKER,
                                           time=T0 + timedelta(milliseconds=seq), phase=None if seq == per_job
                                           else "training", step=seq, epoch=1, epochs=1))
    return out


async def test_many_jobs_are_projected_at_once_and_each_job_in_order(
        bus_factory: BusFactory, view_store: JobViewStore) -> None:
    jobs, per_job = 30, 12
    watched = _Watched(view_store)
    projector = Projector(watched)  # type: ignore[arg-type]
    done = asyncio.Event()
    total = jobs * per_job

    async def project(event: StatusEvent, _delivery: Any) -> None:
        await projector.handle(event)
        if projector.applied + projector.ignored == total:
            done.set()

    bus = await bus_factory()
    events = _events(jobs, per_job)
    for event in events:
        await bus.publish_status(event, event.routing_key, message_id=event.id)
    subscription = await bus.consume_projector(project, model=StatusEvent, prefetch=32)
    try:
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await subscription.close()

    assert projector.ignored == 0, "an event reached the store after a newer one of its job"
    assert projector.applied == total
    assert watched.per_job_peak == 1, "two events of one job were written at once"
    assert watched.peak > 1, "no two writes overlapped: the prefetch was not used"
    for j in range(jobs):
        view = await view_store.get(f"job-{j:03d}")
        assert view is not None and view.state == JobState.SUCCEEDED and view.step == per_job, view


class _Stalling:
    """A view store whose writes hang after ``allowed`` of them: a projector that stops mid-backlog
    with writes in flight and deliveries unacked."""

    def __init__(self, store: JobViewStore, allowed: int) -> None:
        self.store = store
        self.allowed = allowed
        self.reached = asyncio.Event()

    async def apply(self, event: StatusEvent, **kw: Any) -> bool:
        if self.allowed <= 0:
            self.reached.set()
            await asyncio.Event().wait()  # until the projector is torn down
        self.allowed -= 1
        return await self.store.apply(event, **kw)


async def test_a_projector_lost_with_many_events_in_flight_loses_none(
        bus_factory: BusFactory, view_store: JobViewStore) -> None:
    """The first projector dies (its bus connection closed) with up to its prefetch of events
    delivered and unacked, some written, some not; the next one gets every event the first had not
    finished, redelivered in whatever order, and every view ends at its job's last event."""
    jobs, per_job = 20, 10
    total = jobs * per_job
    bus = await bus_factory()
    for event in _events(jobs, per_job):
        await bus.publish_status(event, event.routing_key, message_id=event.id)

    first_bus = await bus_factory()
    stalling = _Stalling(view_store, allowed=total // 3)
    first = Projector(stalling)  # type: ignore[arg-type]

    async def project_first(event: StatusEvent, _delivery: Any) -> None:
        await first.handle(event)

    await first_bus.consume_projector(project_first, model=StatusEvent, prefetch=32)
    await asyncio.wait_for(stalling.reached.wait(), 30)
    assert first.in_flight > 1  # it dies with several events in hand
    await first_bus.close()  # the process is gone: its unacked deliveries go back to the queue

    second = Projector(view_store)

    async def project_second(event: StatusEvent, _delivery: Any) -> None:
        await second.handle(event)

    async def views_at_last_event() -> list[Any]:
        return [await view_store.get(f"job-{j:03d}") for j in range(jobs)]

    subscription = await (await bus_factory()).consume_projector(project_second, model=StatusEvent, prefetch=32)
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while any(v is None or v.last_sequence < per_job for v in await views_at_last_event()):
            assert asyncio.get_running_loop().time() < deadline, (
                f"events were lost: views still short of sequence {per_job} after 60 s: "
                f"{[(v.job_id, v.last_sequence) for v in await views_at_last_event() if v and v.last_sequence < per_job]}")
            await asyncio.sleep(0.05)
    finally:
        await subscription.close()
    assert second.applied > 0  # the second projector wrote what the first had left
    for view in await views_at_last_event():
        assert view.state == JobState.SUCCEEDED and view.step == per_job, view
