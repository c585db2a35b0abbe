"""Nothing lost in transit: a view-store outage pauses the projector, which catches up after it.

One job publishes SUCCEEDED just after the store went down; another beats through the outage, so
its heartbeats pile up in the projector queue. The outage outlasts the watchdog's ``stale_after``
and the time the old projector took to dead-letter the SUCCEEDED (it nacked each failed write at
once: ``projector_delivery_limit`` = 10 of the test topology, so 11 failed writes). Expected:
the views end SUCCEEDED and RUNNING, nothing went through the projector's dead-letter queue, and
the watchdog, paused from the first failed write until the backlog was projected, re-queued
nothing (every view is older than ``stale_after`` when the store returns).

(a) the real parts: RabbitMQ and an nx-27017 of the test's own, SIGKILLed and restarted on the
same port and data dir; (b) the embedded parts: in-process bus, in-memory views behind a switch.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from consumer.roles import run_projector
from consumer.watchdog import Watchdog
from infra.bus import BusSettings, InProcessBus, MessageBus
from infra.bus.rabbit import RabbitBus
from infra.views import InMemoryJobViewStore, JobViewStore, MongoJobViewStore, StoreOutage
from schemas import JobState, StatusEvent, TrainJob, TrainRequest
from schemas.topology import Topology
from tests.fixtures.mongo import start_nx, stop_nx
from tests.fixtures.rabbit import TEST_SETTINGS, new_topology, ready_messages

STALE_AFTER = 1.0  # the watchdog's: shorter than every outage below
# Not a multiple of the 0.05 s backlog polls: a beat landing on every other poll would keep the
# "caught up" check (two empty polls in a row) from ever passing.
BEAT = 0.13
# The projector retries a failed write after 0.05 s, doubling up to 1 s (the default: 0.5 .. 30 s).
RETRY = dict(first_delay=0.05, max_delay=1.0)

StoreSwitch = Callable[[], Awaitable[None]]

# The real-services outage; CDTRAIN_TEST_OUTAGE_S=120 runs the 2-minute version (docs/reliability.md).
LONG_OUTAGE_S = float(os.environ.get("CDTRAIN_TEST_OUTAGE_S", "8"))


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class _Worker:
    """Publishes one job's events as its worker would: QUEUED, STARTING, beats, SUCCEEDED."""

    def __init__(self, bus: MessageBus, name: str) -> None:
        self.bus = bus
        self.job = TrainJob(request=TrainRequest(dataset_uri=f"s3://lake/{name}/"))
        self._sequence = itertools.count(1)
        self._beats: asyncio.Task[None] | None = None
        self.last: StatusEvent | None = None

    async def send(self, state: JobState, **fields: Any) -> StatusEvent:
        event = StatusEvent.for_job(self.job.job_id, next(self._sequence), state, source="/test/worker", **fields)
        await self.bus.publish_status(event, event.routing_key, message_id=event.id)
        self.last = event
        return event

    async def start(self) -> None:
        queued = StatusEvent.queued(self.job, source="/test/ingress")
        await self.bus.publish_status(queued, queued.routing_key, message_id=queued.id)
        await self.send(JobState.STARTING, phase="downloading")
        self._beats = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await self.send(JobState.RUNNING, phase="training", epoch=1, epochs=5)
            await asyncio.sleep(BEAT)

    async def stop_beating(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
            await asyncio.gather(self._beats, return_exceptions=True)


async def _outage_scenario(bus: MessageBus, views: JobViewStore, take_down: StoreSwitch, bring_up: StoreSwitch,
                           *, outage_s: float, caplog: pytest.LogCaptureFixture) -> float:
    """Runs the scenario of the module doc with two jobs: one finishes (SUCCEEDED) just after the
    store went down, the other beats through the outage (its heartbeats pile up behind). Returns
    the seconds from ``bring_up`` (called) to the SUCCEEDED view."""
    requeued: list[str] = []

    async def on_request(request: TrainJob, _delivery: Any) -> None:
        requeued.append(request.job_id)

    async def state_of(worker: _Worker) -> JobState | None:
        view = await views.get(worker.job.job_id)
        return view.state if view is not None else None

    finishing, alive = _Worker(bus, "finishing"), _Worker(bus, "alive")
    requests = await bus.consume_requests(on_request, model=TrainJob, prefetch=5)
    stop, caught_up = asyncio.Event(), asyncio.Event()
    outage = StoreOutage(**RETRY)
    watchdog = Watchdog(bus, views, stale_after=STALE_AFTER, step_stall=None, source="/test/watchdog")
    role = asyncio.create_task(run_projector(bus, views, watchdog, stop, sweep_interval=0.05, caught_up=caught_up,
                                             poll_interval=0.05, outage=outage))
    try:
        for worker in (finishing, alive):
            await worker.start()
            await _until(lambda: _is(state_of(worker), JobState.RUNNING), "the job to run")
        await asyncio.wait_for(caught_up.wait(), 10)  # the watchdog sweeps from here on

        await finishing.stop_beating()
        await take_down()
        succeeded = await finishing.send(JobState.SUCCEEDED, metrics={"f1": 0.9})
        await asyncio.sleep(outage_s)
        assert outage.is_down and not caught_up.is_set(), "the projector did not notice the outage"
        restarted = time.monotonic()
        await bring_up()
        await _until(lambda: _is(state_of(finishing), JobState.SUCCEEDED), "the SUCCEEDED view")
        recovery = time.monotonic() - restarted

        await asyncio.wait_for(caught_up.wait(), 10)
        await asyncio.sleep(0.3)  # sweeps enough to re-queue a job, had one looked silent
        assert requeued == []
        view = await views.get(finishing.job.job_id)
        assert view.state == JobState.SUCCEEDED and view.last_sequence == succeeded.sequence
        assert view.metrics == {"f1": 0.9}
        await alive.stop_beating()
        await _until(lambda: _at(views, alive.last), "the last heartbeat")
        assert await state_of(alive) == JobState.RUNNING
        assert await ready_messages(bus, bus.topology.projector_dead_queue) == 0
        assert not [r for r in caplog.records if r.name == "consumer.dead_letters"], "an event was dead-lettered"
        assert outage.down_since is None
        return recovery
    finally:
        for worker in (finishing, alive):
            await worker.stop_beating()
        stop.set()
        await role
        await requests.close()


async def _is(state: Awaitable[JobState | None], wanted: JobState) -> bool:
    return await state == wanted


async def _at(views: JobViewStore, event: StatusEvent) -> bool:
    view = await views.get(event.job_id)
    return view is not None and view.last_sequence >= event.sequence


async def test_a_mongodb_outage_pauses_the_projector_and_nothing_is_lost(
        amqp_url: str, rabbit_topology: Topology, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """(a) RabbitMQ + nx-27017, killed for 8 s (the old projector dead-lettered the SUCCEEDED in about 3 s)."""
    caplog.set_level(logging.INFO)
    data_dir = tmp_path / "nx"
    data_dir.mkdir()
    nx, url = await asyncio.to_thread(start_nx, data_dir)
    port = int(url.rsplit(":", 1)[1])
    # Short server selection: a write to a store that is gone fails in 0.25 s, as in a real outage
    # (only later: pymongo's default is 30 s).
    views = MongoJobViewStore.connect(url, database=f"outage_{uuid.uuid4().hex[:8]}", serverSelectionTimeoutMS=250)
    bus = RabbitBus(BusSettings(url=amqp_url, **TEST_SETTINGS), rabbit_topology)
    await bus.connect()

    async def take_down() -> None:
        nx.kill()  # SIGKILL: no goodbye to the clients
        await asyncio.to_thread(nx.wait, 10)

    start_up: list[float] = []

    async def bring_up() -> None:
        nonlocal nx
        started = time.monotonic()
        nx, _ = await asyncio.to_thread(start_nx, data_dir, port)  # returns once it answers a ping (0.2 s polls)
        start_up.append(time.monotonic() - started)

    try:
        recovery = await _outage_scenario(bus, views, take_down, bring_up, outage_s=LONG_OUTAGE_S, caplog=caplog)
        print(f"\n[measured] RabbitMQ + nx-27017: view SUCCEEDED {recovery:.2f} s after nx-27017 was restarted "
              f"(which answered a ping after {start_up[0]:.2f} s)")
    finally:
        await bus.close()
        await views.close()
        await asyncio.to_thread(stop_nx, nx)


class _SwitchableViews:
    """A view store that raises ConnectionError from every call while ``down``."""

    def __init__(self, inner: JobViewStore) -> None:
        self._inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise ConnectionError("view store down (test)")
            return await attr(*args, **kwargs)

        return call


async def test_a_view_store_outage_pauses_the_embedded_projector_and_nothing_is_lost(
        caplog: pytest.LogCaptureFixture) -> None:
    """(b) In-process bus + in-memory views that raise for 1.7 s (the old projector: dead-lettered at once)."""
    caplog.set_level(logging.INFO)
    views = _SwitchableViews(InMemoryJobViewStore())
    bus = InProcessBus(BusSettings(**TEST_SETTINGS), new_topology())

    async def take_down() -> None:
        views.down = True

    async def bring_up() -> None:
        views.down = False

    try:
        recovery = await _outage_scenario(bus, views, take_down, bring_up, outage_s=1.7, caplog=caplog)
        print(f"\n[measured] embedded: view SUCCEEDED {recovery:.2f} s after the store answered again")
    finally:
        await bus.close()
