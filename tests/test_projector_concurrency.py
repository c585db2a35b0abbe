"""The projector writes many jobs at once and each job's events in order (infra/views/projector.py).

On both buses and both view stores: events of many jobs, published interleaved and each job's in
sequence order, are consumed with a prefetch above 1. Every view must end at its job's last
event; no event may reach the store stale (one job's writes in delivery order); writes of
different jobs must overlap (otherwise the prefetch bought nothing); and never two of one job.
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
