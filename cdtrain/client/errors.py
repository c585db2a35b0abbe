"""What can go wrong talking to the service, one class per thing the user does differently."""

from __future__ import annotations

from ingress.models import FieldProblem


class ApiError(Exception):
    """The client could not get what it asked for; the message is meant for the user."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServiceUnreachable(ApiError):
    """No HTTP answer at all: connection refused, DNS failure, timeout, connection lost."""


class StreamInterrupted(ApiError):
    """An event stream broke off (or went silent) before the job ended."""


class RequestRejected(ApiError):
    """400 or 422: the service will not accept this input; ``details`` name each bad field."""

    def __init__(self, message: str, *, status: int, field: str | None = None,
                 details: list[FieldProblem] | None = None) -> None:
        super().__init__(message, status=status)
        self.field = field
        self.details = details or []


class Unauthorized(ApiError):
    """401: missing or wrong bearer token."""


class JobNotFound(ApiError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} not found", status=404)
        self.job_id = job_id


class Conflict(ApiError):
    """409: the idempotency key was used before for a different request (or, as
    :class:`JobEnded`, a cancel of a job that already ended)."""

    def __init__(self, message: str, *, job_id: str | None) -> None:
        super().__init__(message, status=409)
        self.job_id = job_id


class JobEnded(Conflict):
    """409 on a cancel: the job already ended; ``state`` is how (SUCCEEDED, FAILED, CANCELLED)."""

    def __init__(self, message: str, *, job_id: str | None, state: str | None) -> None:
        super().__init__(message, job_id=job_id)
        self.state = state


class ServiceUnavailable(ApiError):
    """503: the bus or the view store is down. The message says what became of the job: nothing
    accepted (the usual case: retrying is safe), or, when the bus and the store failed together,
    a job that may still run (retry only with the same idempotency key)."""

    def __init__(self, message: str, *, retry_after: float | None) -> None:
        super().__init__(message, status=503)
        self.retry_after = retry_after


class UnexpectedResponse(ApiError):
    """Any other answer: a 5xx, or a body that is not what the API documents."""
