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
from infra.logs import log_context
from infra.views import JobViewStore, Projector, StoreOutage
from infra.views.projector import DEFAULT_PROJECTOR_PREFETCH
from schemas import StatusEvent, TrainJob
from schemas.control import CancelCommand
from schemas.jobs import attempt_of
from schemas.topology import ALL_CANCELS

from .dead_letters import DeadLetters
from .metrics import ProjectorMetrics
from .sweep_gate import SweepGate
from .watchdog import Watchdog

if TYPE_CHECKING:  # the worker imports torch; the projector role must start without it
    from .worker import TrainingWorker

log = logging.getLogger(__name__)


async def run_worker(bus: MessageBus, worker: "TrainingWorker", stop: asyncio.Event, *,
                     max_jobs: int | None = None, idle_exit_s: float | None = None) -> None:
    """Consume train requests until ``stop`` is set, or until one of the limits ends the worker:

    - ``max_jobs``: take that many requests (a job trained, failed, cancelled or skipped counts),
      then return once the last one has ended: one Kubernetes Job per request, which no scale-down
      stops in the middle;
    - ``idle_exit_s``: return after that long with no job in hand (a one-job worker whose request
      another worker took first).
    """
    if max_jobs is not None and max_jobs < 1:
        raise ValueError("max_jobs must be >= 1")
    if idle_exit_s is not None and idle_exit_s <= 0:
        raise ValueError("idle_exit_s must be > 0")
    loop = asyncio.get_running_loop()
    limits = _WorkerLimits(max_jobs, idle_exit_s, loop.time())

    async def handle(job: TrainJob, delivery) -> None:
        last = limits.take()
        try:
            await worker.handle(job, delivery)
        finally:
            limits.release(loop.time(), last)
        if last:
            # Hold this delivery's slot until the subscription closes. Returning would let the
            # consumer take the next request, which the close would then hand back to the queue,
            # one more delivery counted against its limit.
            await asyncio.Future()

    # Status events an earlier process left in the outbox go out first (the outbox is sent in order).
    worker.start()
    try:
        # Cancel commands first: listening before the first claim leaves no job without a listener.
        control = await bus.subscribe_control(ALL_CANCELS, worker.on_cancel, model=CancelCommand)
        subscription = await bus.consume_requests(worker.handle if limits.unlimited else handle,
                                                  model=TrainJob, prefetch=1)
        log.info("worker consuming train requests and cancel commands%s", limits.describe())
        try:
            ends = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(limits.done.wait())]
            if idle_exit_s is not None:
                ends.append(asyncio.ensure_future(limits.watch_idle(loop)))
            try:
                await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for end in ends:
                    end.cancel()
            if limits.done.is_set() and not stop.is_set():
                log.info("worker took its %d job(s) and they ended: exiting", limits.taken)
        finally:
            await worker.stop()
            await subscription.close()
            await control.close()
    finally:
        await worker.close()


class _WorkerLimits:
    """How many requests a worker may still take, and since when it has had no job in hand."""

    def __init__(self, max_jobs: int | None, idle_exit_s: float | None, now: float) -> None:
        self.max_jobs, self.idle_exit_s = max_jobs, idle_exit_s
        self.taken = 0
        self.running = 0
        self.idle_since = now
        self.done = asyncio.Event()  # the last request the worker may take has ended

    @property
    def unlimited(self) -> bool:
        return self.max_jobs is None and self.idle_exit_s is None

    def describe(self) -> str:
        parts = []
        if self.max_jobs is not None:
            parts.append(f"exits after {self.max_jobs} job(s)")
        if self.idle_exit_s is not None:
            parts.append(f"exits after {self.idle_exit_s:g} s without a job")
        return f" ({'; '.join(parts)})" if parts else ""

    def take(self) -> bool:
        """A request arrived; True when it is the last one this worker takes."""
        self.taken += 1
        self.running += 1
        return self.max_jobs is not None and self.taken >= self.max_jobs

    def release(self, now: float, last: bool) -> None:
        self.running -= 1
        self.idle_since = now
        if last:
            self.done.set()

    async def watch_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.idle_exit_s is not None
        while True:
            left = self.idle_exit_s if self.running else self.idle_since + self.idle_exit_s - loop.time()
            if left <= 0:
                log.info("no train request for %g s: exiting", self.idle_exit_s)
                return
            await asyncio.sleep(left)


async def run_projector(bus: MessageBus, views: JobViewStore, watchdog: Watchdog, stop: asyncio.Event,
                        sweep_interval: float = 60.0, caught_up: asyncio.Event | None = None,
                        poll_interval: float = 0.5, outage: StoreOutage | None = None,
                        dead_letter_source: str = "/cdtrain/dead-letters",
                        prefetch: int = DEFAULT_PROJECTOR_PREFETCH,
                        metrics: ProjectorMetrics | None = None) -> None:
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

    Up to ``prefetch`` events are projected at once, one job's in order (:class:`Projector`).
    ``metrics`` (consumer/metrics.py) reads the projector's counters and lag when scraped.
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
        with log_context(job_id=event.job_id, attempt=attempt_of(event.sequence)):
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
        subscriptions.append(await bus.consume_projector(project, model=StatusEvent, prefetch=prefetch))
        subscriptions.append(await bus.consume_dead_status(dead_letters.on_dead_status))
        subscriptions.append(await bus.consume_dead_requests(dead_letters.on_dead_request))
        gate = SweepGate(bus, projector, stale_after=watchdog.stale_after, poll_interval=poll_interval)
        if metrics is not None:
            metrics.attach(projector, gate)
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
