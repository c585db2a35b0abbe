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
                        sweep_interval: float = 60.0) -> None:
    await views.ensure_indexes()
    projector = Projector(views)

    async def project(event: StatusEvent, _delivery) -> None:
        await projector.handle(event)

    subscription = await bus.consume_projector(project, model=StatusEvent, prefetch=1)
    sweeper = asyncio.create_task(watchdog.run(sweep_interval), name="watchdog")
    log.info("projector consuming status events")
    try:
        await stop.wait()
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        await subscription.close()
