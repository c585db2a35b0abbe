"""Cancelling a job: record the request durably in the job view, then tell the workers.

Order, and why (the worker's side is consumer/cancellation.py):

1. **The view first**, one conditional write (rule 5 of infra/views/merge.py): set
   ``cancel_requested_at`` unless the job ended or a cancel is already recorded. This is the
   record. A worker that claims the job later reads it and never starts the job.
2. **Then the command** ``cancel.<job_id>`` on the control exchange, which stops a running job at
   its next training step. If the broker does not confirm it, the cancel still holds: the
   running worker re-reads the view every heartbeat. So the answer is 202 either way.

A job that already ended answers 409 with why; a second DELETE while the job is being cancelled
answers 202 again (and re-sends the command); once it is CANCELLED, 409 "already cancelled".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infra.bus.errors import BusUnavailable
from ingress.errors import NothingToCancel
from schemas.control import CANCELLED_BY_REQUEST, CancelCommand
from schemas.jobs import JobState, JobView, utc_now
from schemas.topology import cancel_routing_key

if TYPE_CHECKING:
    from infra.bus.base import MessageBus
    from ingress.submit import ViewReader

log = logging.getLogger(__name__)

_ENDED = {JobState.SUCCEEDED: "succeeded", JobState.FAILED: "failed", JobState.CANCELLED: "was cancelled"}


@dataclass(frozen=True)
class CancelOutcome:
    view: JobView
    first: bool  # False: a cancel was already requested (this one repeated it)
    command_sent: bool


class Canceller:
    def __init__(self, bus: MessageBus, views: ViewReader) -> None:
        self.bus = bus
        self.views = views

    async def cancel(self, job_id: str, reason: str = CANCELLED_BY_REQUEST) -> CancelOutcome | None:
        """None for an unknown job; raises NothingToCancel (409) for one that ended, and
        Unavailable (503) when the view store cannot record the request."""
        at = utc_now()
        view, recorded = await self.views.call(self.views.store.request_cancel(job_id, at, reason))
        if view is None:
            return None
        if view.state.is_terminal:
            raise NothingToCancel(job_id, view.state, _why_ended(view))
        command = CancelCommand(job_id=job_id, requested_at=view.cancel_requested_at or at,
                                reason=view.cancel_reason or reason)
        try:
            await self.bus.publish_control(command, cancel_routing_key(job_id))
            sent = True
        except BusUnavailable as exc:
            # Recorded in the view already: the worker that runs the job finds it at its next
            # heartbeat, and one that claims it later skips it.
            log.warning("job %s: cancel command not confirmed (%s); the view holds the request", job_id, exc)
            sent = False
        return CancelOutcome(view=view, first=recorded, command_sent=sent)


def _why_ended(view: JobView) -> str:
    when = view.updated_at.strftime("%Y-%m-%d %H:%M:%SZ")
    verb = _ENDED[view.state]
    if view.state is JobState.CANCELLED:
        return f"job {view.job_id} is already cancelled (at {when}); nothing to cancel"
    reason = f" ({view.error})" if view.state is JobState.FAILED and view.error else ""
    return f"job {view.job_id} already {verb} at {when}{reason}; nothing to cancel"


def cancel_message(outcome: CancelOutcome) -> str:
    """What the 202 says, in words a user acts on."""
    view = outcome.view
    again = "" if outcome.first else " (already requested; sent again)"
    if view.state is JobState.QUEUED:
        return (f"cancel requested{again}: job {view.job_id} is queued and will not start; it shows "
                "CANCELLED once a worker takes it off the queue")
    return (f"cancel requested{again}: job {view.job_id} ({view.state.name}) stops at its next training "
            "step and ends CANCELLED; its checkpoints are kept")
