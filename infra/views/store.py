"""The job view store: what the projector writes and the ingress reads."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol, runtime_checkable

from schemas.events import StatusEvent
from schemas.jobs import JobState, JobView


@runtime_checkable
class JobViewStore(Protocol):
    """Job views keyed by job id; see :mod:`infra.views.merge` for the ordering policy."""

    async def apply(self, event: StatusEvent, *, expect_sequence: int | None = None) -> bool:
        """Project one event. True if it advanced the view; False for a duplicate or stale event.

        With ``expect_sequence`` (rule 7 of :mod:`infra.views.merge`): advance only a view whose
        ``last_sequence`` is exactly that, in one conditional write; False otherwise (an unknown
        job included), and nothing else is merged."""
        ...

    async def create(self, event: StatusEvent) -> bool:
        """Create the job's view from its QUEUED event, only if it has none (rule 10 of
        :mod:`infra.views.merge`); True if this call created it."""
        ...

    async def mark_accepted(self, job_id: str, attempt: int) -> bool:
        """Record that the broker confirmed the request of ``attempt`` (rule 11), unless a newer
        one is recorded; True if this call raised it."""
        ...

    async def mark_accepted_many(self, accepted: Mapping[str, int]) -> int:
        """:meth:`mark_accepted` for each ``job_id: attempt``, in as few writes as the backend
        allows; how many were raised."""
        ...

    async def claim(self, event: StatusEvent) -> bool:
        """A worker's claim of a job (rule 9 of :mod:`infra.views.merge`): project its STARTING
        event only if it is newer than the view and the job has not ended, creating a missing
        view, in one conditional write. True if this attempt now holds the job."""
        ...

    async def get(self, job_id: str) -> JobView | None: ...

    async def request_cancel(self, job_id: str, at: datetime, reason: str) -> tuple[JobView | None, bool]:
        """Record a cancel request unless the job ended or one is recorded (one conditional write,
        rule 5 of :mod:`infra.views.merge`). The view afterwards (None for an unknown job), and
        whether this call recorded the request (times alone cannot tell: they keep milliseconds)."""
        ...

    async def list(
        self, limit: int = 50, cursor: str | None = None, state: JobState | str | None = None
    ) -> tuple[list[JobView], str | None]:
        """Newest first (submitted_at, then job_id); the second item is the next page's cursor.

        Both backends page by the same key (:mod:`infra.views.list_order`), so they give the same
        pages; cursors of either are opaque strings.

        Raises :class:`~infra.views.merge.InvalidCursor` for a cursor it did not produce and
        ValueError for a limit outside 1..1000.
        """
        ...

    async def find_by_idempotency_key(self, key: str) -> JobView | None:
        """The newest job submitted with this idempotency key, if any."""
        ...

    async def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, 0 included): the metrics'
        jobs-by-state gauge. Served from the state index, never by reading the views."""
        ...

    async def ensure_indexes(self) -> None: ...

    async def close(self) -> None: ...
