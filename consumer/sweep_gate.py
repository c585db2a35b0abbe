"""When the watchdog may judge silence: only while the views can show every live job's latest word.

A job looks silent when the projector has not heard from it for ``stale_after`` (its view's
``heard_at``). That reading is only fair while the projector is current. Two things make it
unfair, and the gate holds the sweep through both:

- **The projector runs behind**: its queue holds events, and the newest it projected was
  published more than ``stale_after / 2`` ago. Every live job's recent heartbeats (and a finished
  job's SUCCEEDED) may still wait in that queue.
- **The broker was away** (the projector could not count its queue): workers kept their events
  in their outboxes and send them, with a backoff of up to 30 s, once it is back. For
  ``stale_after`` after the broker is seen again, a job's silence may be the outage's.

The projector's own start, and a view-store outage, are covered by ``caught_up`` in
:func:`consumer.roles.run_projector`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from infra.bus import MessageBus
from infra.views import Projector
from schemas import utc_now

log = logging.getLogger(__name__)


class SweepGate:
    def __init__(self, bus: MessageBus, projector: Projector, *, stale_after: float, poll_interval: float) -> None:
        self.bus = bus
        self.projector = projector
        self.stale_after = stale_after
        self.poll_interval = poll_interval
        self.broker_back_at = -math.inf  # monotonic; -inf: not seen away since the start
        self.broker_away = False
        self.backlog = 0

    def lag(self) -> float:
        """Seconds the projector runs behind its queue (0 while the queue is empty)."""
        if self.backlog == 0 and self.projector.in_flight == 0:
            return 0.0
        if self.projector.last_event_time is None:
            return math.inf
        return (utc_now() - self.projector.last_event_time).total_seconds()

    def hold_reason(self) -> str | None:
        """Why the watchdog must not sweep now; None when it may."""
        if self.broker_away:
            return "the projector cannot reach the broker"
        since_back = time.monotonic() - self.broker_back_at
        if since_back < self.stale_after:
            return (f"the broker came back {since_back:.0f} s ago: the workers' held events may still be on "
                    "their way")
        lag = self.lag()
        if lag > self.stale_after / 2:
            return f"the projector runs {lag:.0f} s behind its queue ({self.backlog} events waiting)"
        return None

    async def watch(self) -> None:
        """Count the projector queue every ``poll_interval`` s; note when the broker goes and comes back."""
        while True:
            try:
                self.backlog = await self.bus.projector_backlog()
            except Exception as exc:  # noqa: BLE001 - any failure: the broker is away for the projector
                if not self.broker_away:
                    log.warning("projector cannot reach the broker (%s): the watchdog holds its sweeps", exc)
                self.broker_away = True
            else:
                if self.broker_away:
                    self.broker_away, self.broker_back_at = False, time.monotonic()
                    log.info("the broker is back: the watchdog waits %g s for the workers' held events",
                             self.stale_after)
            await asyncio.sleep(self.poll_interval)
