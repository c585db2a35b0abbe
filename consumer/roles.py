"""The consumer side's process roles, each running until ``stop`` is set.

- worker: train requests and cancel commands in (prefetch 1: one job per GPU), status events out;
- projector: status events into job views, plus the watchdog that re-queues silent jobs and the
  consumer of both dead-letter queues (consumer/dead_letters.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from infra.bus import MessageBus, Subscription
from infra.views import JobViewStore, Projector, StoreOutage
from schemas import StatusEvent, TrainJob
from schemas.control import CancelCommand
from schemas.topology import ALL_CANCELS

from .dead_letters import DeadLetters
from .sweep_gate import SweepGate
from .watchdog import Watchdog

if TYPE_CHECKING:  # the worker imports torch; the projector role must start without it
    from .worker import TrainingWorker

log = logging.getLogger(__name__)


async def run_worker(bus: MessageBus, worker: "TrainingWorker", stop: asyncio.Event) -> None:
    # Status events an earlier process left in the outbox go out first (the outbox is sent in order).
    worker.start()
    try:
        # Cancel commands first: listening before the first claim leaves no job without a listener.
        control = await bus.subscribe_control(ALL_CANCELS, worker.on_cancel, model=CancelCommand)
        subscription = await bus.consume_requests(worker.handle, model=TrainJob, prefetch=1)
        log.info("worker consuming train requests and cancel commands")
        try:
            await stop.wait()
        finally:
            await worker.stop()
            await subscription.close()
            await control.close()
    finally:
        await worker.close()


async def run_projector(bus: MessageBus, views: JobViewStore, watchdog: Watchdog, stop: asyncio.Event,
                        sweep_interval: float = 60.0, caught_up: asyncio.Event | None = None,
                        poll_interval: float = 0.5, outage: StoreOutage | None = None,
                        dead_letter_source: str = "/cdtrain/dead-letters") -> None:
    """Project status events and answer the dead-letter queues; the watchdog sweeps only while
    the projector has caught up.

    ``caught_up`` (made here if not given) is set once the projector queue has been seen empty,
    with no event being projected and the view store up, at two polls ``poll_interval`` apart:
    then every event that waited in the queue while no projector ran is in the views before the
    first sweep. It is cleared the moment the view store goes down (``outage``, made here if not
    given, pauses the projector and the dead letters until it is back): the heartbeats that pile
    up meanwhile are projected before the watchdog judges anything again. Between those, the
    watchdog also holds while the projector runs behind or the broker was just away
    (consumer/sweep_gate.py).
    """
    await views.ensure_indexes()
    outage = outage if outage is not None else StoreOutage()
    projector = Projector(views, outage)
    dead_letters = DeadLetters(bus, projector, source=dead_letter_source)
    caught_up = caught_up if caught_up is not None else asyncio.Event()
    store_went_down = asyncio.Event()

    def pause_watchdog() -> None:
        caught_up.clear()
        store_went_down.set()

    outage.add_down_callback(pause_watchdog)

    async def project(event: StatusEvent, _delivery) -> None:
        await projector.handle(event)

    async def until_caught_up() -> None:
        idle_polls = 0
        while idle_polls < 2:
            await asyncio.sleep(poll_interval)
            try:
                empty = (await bus.projector_backlog() == 0 and projector.in_flight == 0
                         and not outage.is_down)
            except Exception:  # noqa: BLE001 - a broker hiccup: poll again
                log.warning("cannot count the projector queue; the watchdog keeps waiting", exc_info=True)
                empty = False
            idle_polls = idle_polls + 1 if empty else 0
        log.info("projector caught up with its queue (%d events projected)", projector.applied + projector.ignored)

    async def watch_backlog() -> None:
        while True:
            await until_caught_up()
            caught_up.set()
            await store_went_down.wait()
            store_went_down.clear()
            caught_up.clear()
            log.info("view store down: the watchdog waits until the projector has caught up again")

    subscriptions: list[Subscription] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        subscriptions.append(await bus.consume_projector(project, model=StatusEvent, prefetch=1))
        subscriptions.append(await bus.consume_dead_status(dead_letters.on_dead_status))
        subscriptions.append(await bus.consume_dead_requests(dead_letters.on_dead_request))
        gate = SweepGate(bus, projector, stale_after=watchdog.stale_after, poll_interval=poll_interval)
        tasks.append(asyncio.create_task(watch_backlog(), name="projector-backlog"))
        tasks.append(asyncio.create_task(gate.watch(), name="sweep-gate"))
        tasks.append(asyncio.create_task(watchdog.run(sweep_interval, caught_up=caught_up, gate=gate.hold_reason),
                                         name="watchdog"))
        log.info("projector consuming status events and dead letters")
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for subscription in subscriptions:
            await subscription.close()
