"""Commands to running workers, on the control exchange (``schemas.topology``). Pure data.

A command is the fast path only: the durable record of a cancellation is the job view's
``cancel_requested_at`` (written by the ingress before it publishes the command), which a worker
reads when it claims a job and polls while the job runs. So a command may be lost (no worker was
listening, a broker blip) without losing the cancellation.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.jobs import JOB_ID_PATTERN, UtcDatetime, utc_now

# The error/reason of a job that ends CANCELLED because a user asked (DELETE /train/{id}), as
# opposed to a worker shutdown, which re-queues the job instead.
CANCELLED_BY_REQUEST = "cancelled by request"


class CancelCommand(BaseModel):
    """Stop job ``job_id`` at its next check; it ends CANCELLED and is not re-queued."""

    # Tolerant reader, as for TrainJob: a newer ingress may add fields.
    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    requested_at: UtcDatetime = Field(default_factory=utc_now)
    reason: str = CANCELLED_BY_REQUEST
