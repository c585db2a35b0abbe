"""Recording the broker's confirms in the views (rule 11), many jobs per write.

The record only spares the watchdog a republish (ingress/submit.py), so it need not be written
before the answer, nor one job at a time: while one write is in flight the next confirms gather,
and the next write takes them all. Under load that is one store round trip for many POSTs
instead of one each; alone, a confirm is written at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingress.submit import ViewReader

log = logging.getLogger(__name__)


class AcceptanceRecorder:
    def __init__(self, views: "ViewReader", *, max_batch: int = 500) -> None:
        self.views = views
        self.max_batch = max_batch
        self._pending: dict[str, int] = {}
        self._writer: asyncio.Task[None] | None = None

    def record(self, job_id: str, attempt: int) -> None:
        """Queue the record; written by the running write's successor, or now if none runs."""
        self._pending[job_id] = max(attempt, self._pending.get(job_id, attempt))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="record-confirms")

    async def _write_all(self) -> None:
        while self._pending:
            batch = dict(list(self._pending.items())[: self.max_batch])
            for job_id in batch:
                del self._pending[job_id]
            try:
                await self.views.call(self.views.store.mark_accepted_many(batch))
            except Exception as exc:  # noqa: BLE001 - Unavailable, or a store bug: never lose the rest
                # The requests are in the queue; the watchdog will publish copies that the claim refuses.
                log.warning("the confirms of %d job(s) were not recorded (%s): %s", len(batch), exc,
                            ", ".join(list(batch)[:5]) + (" ..." if len(batch) > 5 else ""))

    async def close(self) -> None:
        """Wait for the records queued so far (each write bounded by the store timeout)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.gather(self._writer, return_exceptions=True)
