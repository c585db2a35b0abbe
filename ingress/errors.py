"""Errors the ingress's parts raise; the HTTP layer and the listeners map them to outcomes.

Kept free of aiohttp so the bucket-event listeners (no HTTP involved) share them.
"""

from __future__ import annotations

from ingress.models import FieldProblem


class MalformedBody(ValueError):
    """The body is not JSON at all (HTTP 400)."""


class RequestInvalid(ValueError):
    """JSON that is not an acceptable request (HTTP 422); ``details`` name each bad field."""

    def __init__(self, what: str, details: list[FieldProblem]) -> None:
        self.details = details
        summary = "; ".join(f"{d.field}: {d.message}" for d in details)
        super().__init__(f"invalid {what}: {summary}")

    @property
    def field(self) -> str | None:
        return self.details[0].field if self.details else None


class LocationNotAllowed(RequestInvalid):
    """A dataset or config location outside CDTRAIN_ALLOWED_URIS (HTTP 403); names the field."""


class IdempotencyConflict(ValueError):
    """An idempotency key reused with a different request (HTTP 409)."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for job {job_id} with a different request; "
            "use a new key for a new job"
        )
        self.job_id = job_id


class NothingToCancel(ValueError):
    """DELETE of a job that already ended (HTTP 409); the message says how it ended, and when."""

    def __init__(self, job_id: str, state: object, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state


class Unavailable(Exception):
    """A dependency (bus, view store, object store) cannot serve now; retry later (HTTP 503).

    Nothing was accepted when this is raised, so a retry is safe (and deduplicated).
    """

    def __init__(self, what: str, message: str, *, retry_after: float) -> None:
        super().__init__(f"{what} unavailable: {message}")
        self.what = what
        self.retry_after = retry_after
