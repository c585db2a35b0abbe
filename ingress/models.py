"""Pydantic models of what the ingress answers (the JSON bodies documented in docs/api.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from schemas.jobs import JobState, JobView, UtcDatetime


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True)


class FieldProblem(_Body):
    field: str  # dotted, e.g. "config.epochz"; "(root)" for the body itself
    message: str
    type: str  # pydantic's error type, e.g. "extra_forbidden", "missing", "greater_than"


class ErrorBody(_Body):
    error: str
    field: str | None = None
    details: list[FieldProblem] | None = None
    retry_after: int | None = None
    job_id: str | None = None
    state: str | None = None  # on a 409 of DELETE /train/{id}: the state the job ended in


class Accepted(_Body):
    """Answer to POST /train: 202 for a new job, 200 when an idempotency key matched one."""

    job_id: str
    status_url: str
    # Upper-case state name, as the submission API has always answered ("QUEUED").
    state: str
    duplicate: bool = False


class CancelAccepted(_Body):
    """Answer to DELETE /train/{job_id} (202): the cancel is recorded; the job stops soon."""

    job_id: str
    status_url: str
    # Upper-case state name, as POST /train answers: the state *now* (QUEUED, STARTING, RUNNING);
    # the job view shows CANCELLED once its worker has stopped it.
    state: str
    cancel_requested_at: UtcDatetime
    message: str


class JobList(_Body):
    jobs: list[JobView]
    next_cursor: str | None = None


class SseEnd(_Body):
    """The ``end`` event of GET /train/{job_id}/events: the job ended; the stream closes."""

    job_id: str
    state: JobState  # lower-case value, as in the job view


class TriggerResult(_Body):
    """What one bucket object did: started a job, matched an existing one, or nothing."""

    uri: str
    action: Literal["started", "duplicate", "ignored"]
    job_id: str | None = None
    reason: str
    dataset_uri: str | None = None
    config_uri: str | None = None


class BucketEventsResult(_Body):
    results: list[TriggerResult]


class Readiness(_Body):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
    error: str | None = None
