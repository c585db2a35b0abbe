"""How a worker learns that a job was cancelled (DELETE /train/{id}), and its per-job stop switch.

Two paths, so that no cancellation is missed and a running job stops quickly:

- **The job view** (durable): the ingress records ``cancel_requested_at`` before it publishes
  anything. A worker reads it (:func:`cancel_reason`) when it claims a job (a queued job that
  was cancelled never starts), and again every heartbeat while the job runs (a command lost on
  the bus still stops the job within one interval; consumer/ownership.py reads the view).
- **The control command** (fast): ``cancel.<job_id>`` on the control exchange, which sets the
  running job's :class:`JobControl` at once.

The worker registers the job's control *before* it reads the view, and the ingress writes the
view *before* it publishes the command. So either the read sees the request, or the command was
published after the control existed and reaches it: there is no window where both miss.
"""

from __future__ import annotations

import asyncio
import threading

from schemas.control import CANCELLED_BY_REQUEST
from schemas.jobs import JobState, JobView


def cancel_reason(view: JobView | None) -> str | None:
    """The reason when the job is cancelled or a cancel was requested, else None."""
    if view is None:
        return None
    if view.state is JobState.CANCELLED:
        return view.error or CANCELLED_BY_REQUEST
    # A pending request stops the job; so does one on a job FAILED by the watchdog at its
    # deadline (consumer/watchdog.py, end_overdue), for the worker still running it or one that
    # claims it. A job that ended otherwise is not this check's business (a cancel that came
    # too late leaves SUCCEEDED as it is; a finished job is never claimed again: rule 9).
    if view.cancel_requested_at is not None and (not view.state.is_terminal or view.state is JobState.FAILED):
        return view.cancel_reason or CANCELLED_BY_REQUEST
    return None


class JobControl:
    """One job's stop switch. ``token`` is the trainer's cancel token (checked every step, from
    the training thread). Why it was set decides how the job ends: a user's cancel (``reason``:
    CANCELLED), a newer attempt that took the job over (``superseded``: this attempt stops and
    says nothing more), or a worker shutdown (``stop``: the job is re-queued). A cancel wins
    over the others."""

    def __init__(self) -> None:
        self.token = threading.Event()
        self.reason: str | None = None
        self.superseded = False
        # Set on the event loop with the token: wakes what waits there (the dataset fetch).
        self.interrupted = asyncio.Event()

    def cancel(self, reason: str = CANCELLED_BY_REQUEST) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop()

    def supersede(self) -> None:
        self.superseded = True
        self.stop()

    def stop(self) -> None:
        self.interrupted.set()
        self.token.set()

    @property
    def cancel_requested(self) -> bool:
        return self.reason is not None
