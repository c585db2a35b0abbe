"""The projector role's core: status events in, job views out."""

from __future__ import annotations

import logging
from datetime import datetime

from infra.keyed_locks import KeyedLocks
from infra.views.outage import StoreOutage
from infra.views.store import JobViewStore
from schemas.events import StatusEvent

log = logging.getLogger(__name__)

# Events projected at once. One at a time, each waits for a broker delivery and a store round
# trip: a few hundred events a second on loopback, fewer on a loaded host (docs/benchmarks.md).
DEFAULT_PROJECTOR_PREFETCH = 64


class Projector:
    """Applies status events to a view store; safe under redelivery and reordering.

    The store's conditional write records the processed sequence with the view, so the bus
    delivery can be acked once ``handle`` returns, whatever it returned. While the store is
    down, ``handle`` does not return (nor raise, which would nack the event toward its delivery
    limit): it retries the same event through ``outage`` until the store is back.

    Calls may overlap (the projector consumes with a prefetch above 1, because one store round
    trip per event at a time caps it at a few hundred events a second). Events of different
    jobs are written concurrently; those of one job one after the other, in the order ``handle``
    was called, so that a job's backlog is written in sequence order rather than as a race of
    stale writes (which the store would also resolve, at the cost of extra round trips).
    """

    def __init__(self, store: JobViewStore, outage: StoreOutage | None = None) -> None:
        self.store = store
        self.outage = outage if outage is not None else StoreOutage()
        self.applied = 0
        self.ignored = 0
        # Events being projected now, including one held through a store outage: the
        # watchdog's "caught up" check needs none.
        self.in_flight = 0
        # The publisher's time of the newest event projected: how far behind the projector runs
        # while its queue is not empty (consumer/sweep_gate.py).
        self.last_event_time: datetime | None = None
        self._per_job = KeyedLocks()

    @property
    def store_down_since(self) -> datetime | None:
        """When the view store stopped answering; None while it answers."""
        return self.outage.down_since

    async def handle(self, event: StatusEvent) -> bool:
        self.in_flight += 1
        try:
            async with self._per_job.hold(event.job_id):
                advanced = await self.outage.call(f"project event {event.id} of job {event.job_id}",
                                                  lambda: self.store.apply(event))
        finally:
            self.in_flight -= 1
        self.last_event_time = event.time
        if advanced:
            self.applied += 1
        else:
            self.ignored += 1
            log.debug(
                "status event %s for job %s (sequence %d) is a duplicate or stale",
                event.id,
                event.job_id,
                event.sequence,
            )
        return advanced
