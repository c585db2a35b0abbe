"""How a worker learns that a job was cancelled (DELETE /train/{id}), and its per-job stop switch.

Two paths, so that no cancellation is missed and a running job stops quickly:

- **The job view** (durable): the ingress records ``cancel_requested_at`` before it publishes
  anything. A worker reads it through a :class:`CancellationLookup` when it claims a job (a
  queued job that was cancelled never starts), and again every heartbeat while the job runs
  (a command lost on the bus still stops the job within one interval).
- **The control command** (fast): ``cancel.<job_id>`` on the control exchange, which sets the
  running job's :class:`JobControl` at once.

The worker registers the job's control *before* it reads the view, and the ingress writes the
view *before* it publishes the command. So either the read sees the request, or the command was
published after the control existed and reaches it: there is no window where both miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from schemas.control import CANCELLED_BY_REQUEST
from schemas.jobs import JobState

if TYPE_CHECKING:
    from infra.views.store import JobViewStore

log = logging.getLogger(__name__)


class CancellationLookup(Protocol):
    """Read-only: was this job cancelled, or asked to be? (injected into the worker)"""

    async def cancel_reason(self, job_id: str) -> str | None:
        """The reason when the job is cancelled or a cancel was requested, else None."""
        ...


class ViewCancellations:
    """:class:`CancellationLookup` over the job view store (MongoDB, or the embedded JSON file)."""

    def __init__(self, views: JobViewStore) -> None:
        self.views = views

    async def cancel_reason(self, job_id: str) -> str | None:
        view = await self.views.get(job_id)
        if view is None:
            return None
        if view.state is JobState.CANCELLED:
            return view.error or CANCELLED_BY_REQUEST
        # A pending request stops the job; so does one on a job FAILED by the watchdog at its
        # deadline (consumer/watchdog.py, end_overdue), for the worker still running it or one that
        # claims it. A job that ended otherwise is not this lookup's business (a cancel that came
        # too late leaves SUCCEEDED as it is; duplicates of finished jobs are a lease's job).
        if view.cancel_requested_at is not None and (not view.state.is_terminal or view.state is JobState.FAILED):
            return view.cancel_reason or CANCELLED_BY_REQUEST
        return None


class JobControl:
    """One job's stop switch. ``token`` is the trainer's cancel token (checked every step, from
    the training thread); ``reason`` tells a user's cancel (the job ends CANCELLED) from a worker
    shutdown (``stop``: the job is re-queued). A cancel wins over a shutdown."""

    def __init__(self) -> None:
        self.token = threading.Event()
        self.reason: str | None = None
        # Set on the event loop with the reason: wakes what waits there (the dataset fetch).
        self.cancelled = asyncio.Event()

    def cancel(self, reason: str = CANCELLED_BY_REQUEST) -> None:
        if self.reason is None:
            self.reason = reason
        self.cancelled.set()
        self.token.set()

    def stop(self) -> None:
        self.token.set()

    @property
    def cancel_requested(self) -> bool:
        return self.reason is not None


async def lookup_reason(lookup: CancellationLookup | None, job_id: str) -> str | None:
    """The lookup's answer; None (and a warning) when it fails: the job then runs, and the poll
    or the bus command can still stop it. Availability over a strict check."""
    if lookup is None:
        return None
    try:
        return await lookup.cancel_reason(job_id)
    except Exception as exc:  # noqa: BLE001 - any store failure means "not known now"
        log.warning("job %s: cannot read whether it was cancelled (%s); going on", job_id, exc)
        return None


@contextlib.asynccontextmanager
async def poll_cancellation(lookup: CancellationLookup | None, job_id: str, control: JobControl,
                            interval: float) -> AsyncIterator[None]:
    """While the body runs, re-read the job view every ``interval`` s and cancel on a request."""
    if lookup is None:
        yield
        return

    async def loop() -> None:
        while not control.cancel_requested:
            await asyncio.sleep(interval)
            reason = await lookup_reason(lookup, job_id)
            if reason is not None:
                log.info("job %s: cancel request found in its view", job_id)
                control.cancel(reason)

    task = asyncio.create_task(loop(), name=f"cancel-poll-{job_id}")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
