"""The watchdog's sweep gate (consumer/sweep_gate.py): no judging silence while the projector runs
behind its queue, or right after the broker was away from it (the workers' outboxes still
sending what they held). The soak (tests/test_soak.py) shows what went wrong without it."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from consumer.sweep_gate import SweepGate
from infra.bus import BusUnavailable, MessageBus
from infra.views import InMemoryJobViewStore, Projector
from schemas import StatusEvent, utc_now


class AwayBus:
    """The projector's bus, which can lose the broker (``away``)."""

    def __init__(self, inner: MessageBus) -> None:
        self.inner, self.away = inner, False

    async def projector_backlog(self) -> int:
        if self.away:
            raise BusUnavailable("the connection to RabbitMQ is down (reconnecting)")
        return await self.inner.projector_backlog()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_the_watchdog_holds_while_the_projector_runs_behind(bus: MessageBus) -> None:
    projector = Projector(InMemoryJobViewStore())
    gate = SweepGate(bus, projector, stale_after=10.0, poll_interval=0.01)
    watching = asyncio.create_task(gate.watch())
    try:
        for sequence in range(3):  # waiting in the projector queue: nobody consumes it here
            event = StatusEvent.for_job("behind", sequence, "running", source="/test/worker")
            await bus.publish_status(event, event.routing_key)
        old = StatusEvent.for_job("behind", 9, "running", source="/test/worker", time=utc_now() - timedelta(seconds=30))
        await projector.handle(old)  # the newest it projected was published 30 s ago
        await asyncio.sleep(0.1)
        assert gate.backlog == 3
        assert gate.hold_reason().startswith("the projector runs 30 s behind its queue (3 events waiting)")
        fresh = StatusEvent.for_job("behind", 10, "running", source="/test/worker")
        await projector.handle(fresh)  # 4 s behind at most: under stale_after / 2
        assert gate.hold_reason() is None
    finally:
        watching.cancel()


async def test_the_watchdog_holds_while_the_broker_is_away_and_a_while_after(bus: MessageBus) -> None:
    away = AwayBus(bus)
    gate = SweepGate(away, Projector(InMemoryJobViewStore()), stale_after=0.5, poll_interval=0.01)  # type: ignore[arg-type]
    watching = asyncio.create_task(gate.watch())
    try:
        await asyncio.sleep(0.05)
        assert gate.hold_reason() is None  # never away since the start
        away.away = True
        await asyncio.sleep(0.05)
        assert gate.hold_reason() == "the projector cannot reach the broker"
        away.away = False
        await asyncio.sleep(0.05)
        assert gate.hold_reason().startswith("the broker came back 0 s ago")
        await asyncio.sleep(0.6)  # stale_after: the workers' held events had the time to arrive
        assert gate.hold_reason() is None
    finally:
        watching.cancel()
