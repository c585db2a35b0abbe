"""Capped exponential backoff, for the callers that retry without end (the worker's status outbox,
the projector during a view-store outage): an outage delays their work, it never drops it."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field


class RetryBackoff(BaseModel):
    """Delays between attempts: ``first_s``, then times ``factor``, each at most ``max_s``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    first_s: float = Field(0.5, gt=0)
    max_s: float = Field(30.0, gt=0)
    factor: float = Field(2.0, ge=1)

    def delays(self) -> Iterator[float]:
        delay = self.first_s
        while True:
            yield min(delay, self.max_s)
            delay *= self.factor
