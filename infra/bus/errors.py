"""Errors the bus raises; callers catch these, never a broker client's own exceptions."""

from __future__ import annotations


class BusError(Exception):
    """Base class of every bus error."""


class BusUnavailable(BusError):
    """The bus could not take a message right now (broker down, reconnecting, no confirm).

    Nothing was (knowingly) accepted: the caller may retry later. The HTTP edge answers 503
    with ``Retry-After: retry_after`` seconds.
    """

    def __init__(self, message: str, *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeliveryLost(BusError):
    """A delivery can no longer be settled: its channel closed before the ack was confirmed.

    The broker has requeued it (or may have, when the ack was in flight), so it will be
    delivered again: the handler must stop working on it.
    """
