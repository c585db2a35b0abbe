"""One owner per job: an attempt claims the job in its view, and stops once it no longer holds it.

The claim is the worker's own STARTING event, written to the job view store before it is
published (``JobViewStore.claim``, rule 9 of :mod:`infra.views.merge`): one conditional write that
succeeds only for an attempt newer than every event of the job and only while the job has not
ended. The attempt that holds the job is the view's ``attempt_of(last_sequence)``.

While the job runs, :func:`watch_job` re-reads the view every heartbeat interval. A cancel
request stops the job (consumer/cancellation.py); a view that moved to a later attempt (the
watchdog re-queued the job, and maybe another worker claimed it) means this attempt was
superseded: it stops at its next step without registering anything, and the next attempt
resumes from its checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from infra.backoff import retry_briefly
from infra.views.store import JobViewStore
from schemas import JobView, StatusEvent
from schemas.jobs import attempt_of

from .cancellation import JobControl, cancel_reason

log = logging.getLogger(__name__)


class ClaimUnavailable(RuntimeError):
    """The view store did not answer the claim: the delivery goes back to the queue."""


def is_superseded(view: JobView | None, attempt: int) -> bool:
    return view is not None and attempt_of(view.last_sequence) > attempt


async def claim_job(views: JobViewStore, starting: StatusEvent,
                    retry_delays: tuple[float, ...] = (0.5, 1, 2, 5, 10)) -> bool:
    """Write the attempt's STARTING event as its claim; False when the job is not this attempt's
    to run. A store that does not answer is retried, then :class:`ClaimUnavailable` (training
    without the lease could run the job twice)."""
    def retrying(exc: Exception, delay: float) -> None:
        log.warning("job %s: claim not written (%s); retrying in %ss", starting.job_id, exc, delay)

    try:
        return await retry_briefly(lambda: views.claim(starting), retry_delays, retrying)
    except Exception as exc:  # noqa: BLE001 - any store failure: give the job back
        raise ClaimUnavailable(f"job {starting.job_id}: the job view store did not take the claim: {exc}") from exc


async def read_view(views: JobViewStore | None, job_id: str) -> JobView | None:
    """The job's view; None when there is none or the store fails (a warning): the job then goes
    on, and the next read or the bus can still stop it. Availability over a strict check."""
    if views is None:
        return None
    try:
        return await views.get(job_id)
    except Exception as exc:  # noqa: BLE001 - any store failure means "not known now"
        log.warning("job %s: cannot read its view (%s); going on", job_id, exc)
        return None


def check_view(view: JobView | None, attempt: int, control: JobControl) -> None:
    """Stop the job when its view says so: a cancel request, or a later attempt holds it."""
    reason = cancel_reason(view)
    if reason is not None:
        if not control.cancel_requested:
            log.info("job %s: cancel request found in its view", view.job_id)
        control.cancel(reason)
    elif is_superseded(view, attempt) and not control.superseded:
        log.warning("job %s: attempt %d was superseded by attempt %d; stopping without registering",
                    view.job_id, attempt, attempt_of(view.last_sequence))
        control.supersede()


@contextlib.asynccontextmanager
async def watch_job(views: JobViewStore | None, job_id: str, attempt: int, control: JobControl,
                    interval: float) -> AsyncIterator[None]:
    """While the body runs, re-read the job view every ``interval`` s and act on it."""
    if views is None:
        yield
        return

    async def loop() -> None:
        while not (control.cancel_requested or control.superseded):
            await asyncio.sleep(interval)
            check_view(await read_view(views, job_id), attempt, control)

    task = asyncio.create_task(loop(), name=f"watch-{job_id}")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
