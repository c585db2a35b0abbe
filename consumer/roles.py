"""The consumer side's process roles, each running until ``stop`` is set.

- worker: train requests and cancel commands in (prefetch 1: one job per GPU), status events out;
- projector: status events into job views, plus the watchdog that re-queues silent jobs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from infra.bus import MessageBus
from infra.views import JobViewStore, Projector
from schemas import StatusEvent, TrainJob
from schemas.control import CancelCommand
from schemas.topology import ALL_CANCELS

from .watchdog import Watchdog

if TYPE_CHECKING:  # the worker imports torch; the projector role must start without it
    from .worker import TrainingWorker

log = logging.getLogger(__name__)


async def run_worker(bus: MessageBus, worker: "TrainingWorker", stop: asyncio.Event) -> None:
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


async def run_projector(bus: MessageBus, views: JobViewStore, watchdog: Watchdog, stop: asyncio.Event,
                        sweep_interval: float = 60.0, caught_up: asyncio.Event | None = None,
                        poll_interval: float = 0.5) -> None:
    """Project status events; the watchdog sweeps once the projector has caught up.

    ``caught_up`` (made here if not given) is set once the projector queue has been seen empty,
    with no event being projected, at two polls ``poll_interval`` apart: then every event that
    waited in the queue while no projector ran is in the views before the first sweep.
    """
    await views.ensure_indexes()
    projector = Projector(views)
    caught_up = caught_up if caught_up is not None else asyncio.Event()

    async def project(event: StatusEvent, _delivery) -> None:
        await projector.handle(event)

    async def watch_backlog() -> None:
        idle_polls = 0
        while idle_polls < 2:
            await asyncio.sleep(poll_interval)
            try:
                empty = await bus.projector_backlog() == 0 and projector.in_flight == 0
            except Exception:  # noqa: BLE001 - a broker hiccup: poll again
                log.warning("cannot count the projector queue; the watchdog keeps waiting", exc_info=True)
                empty = False
            idle_polls = idle_polls + 1 if empty else 0
        log.info("projector caught up with its queue (%d events projected)", projector.applied + projector.ignored)
        caught_up.set()

    subscription = await bus.consume_projector(project, model=StatusEvent, prefetch=1)
    backlog = asyncio.create_task(watch_backlog(), name="projector-backlog")
    sweeper = asyncio.create_task(watchdog.run(sweep_interval, caught_up=caught_up), name="watchdog")
    log.info("projector consuming status events")
    try:
        await stop.wait()
    finally:
        for task in (sweeper, backlog):
            task.cancel()
        await asyncio.gather(sweeper, backlog, return_exceptions=True)
        await subscription.close()
