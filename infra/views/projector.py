"""The projector role's core: status events in, job views out."""

from __future__ import annotations

import logging

from infra.views.store import JobViewStore
from schemas.events import StatusEvent

log = logging.getLogger(__name__)


class Projector:
    """Applies status events to a view store; safe under redelivery and reordering.

    The store's conditional write records the processed sequence with the view, so the bus
    delivery can be acked once ``handle`` returns, whatever it returned.
    """

    def __init__(self, store: JobViewStore) -> None:
        self.store = store
        self.applied = 0
        self.ignored = 0
        self.in_flight = 0  # events being projected now (the "caught up" check needs none)

    async def handle(self, event: StatusEvent) -> bool:
        self.in_flight += 1
        try:
            advanced = await self.store.apply(event)
        finally:
            self.in_flight -= 1
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
