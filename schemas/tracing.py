"""W3C Trace Context ``traceparent``: read one, start a trace, continue it in a child span.

A job's trace runs from the POST that submitted it to every status event of every attempt: the
ingress continues the caller's ``traceparent`` header (or starts a trace), the job on the bus
carries it (:attr:`schemas.jobs.TrainJob.traceparent`), and each status event carries the span of
the process that made it as the CloudEvents distributed-tracing extension attribute
``traceparent``. Any tracing back end can join them by trace id; no tracing SDK is needed here.

Format (version ``00``): ``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``, lower case;
an all-zero trace or parent id is invalid. A later version is read by its first four fields
(the specification's forward compatibility) and written back as version 00. Pure, no I/O.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

__all__ = ["TRACEPARENT_HEADER", "TRACEPARENT_PATTERN", "TraceParent", "TraceParentField", "continue_trace",
           "valid_traceparent"]

TRACEPARENT_HEADER = "traceparent"
# What this service writes (the JSON schemas say so); all-zero ids are refused by parse().
TRACEPARENT_PATTERN = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"

_FIELDS = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_SAMPLED = 0x01


@dataclass(frozen=True)
class TraceParent:
    trace_id: str
    parent_id: str
    flags: int = _SAMPLED

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags:02x}"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & _SAMPLED)

    @classmethod
    def parse(cls, value: str | None) -> TraceParent | None:
        """The header's fields, or None when it is absent or invalid (the caller starts a trace)."""
        if not isinstance(value, str):
            return None
        value = value.strip()
        match = _FIELDS.match(value)
        if match is None:
            return None
        version, trace_id, parent_id, flags = match.groups()
        if version == "ff" or (version == "00" and len(value) != 55):
            return None
        # A later version may append fields, always after a dash.
        if version != "00" and len(value) > 55 and value[55] != "-":
            return None
        if trace_id == "0" * 32 or parent_id == "0" * 16:
            return None
        return cls(trace_id, parent_id, int(flags, 16))

    @classmethod
    def new(cls, *, sampled: bool = True) -> TraceParent:
        """The root span of a new trace."""
        return cls(_random_hex(16), _random_hex(8), _SAMPLED if sampled else 0)

    def child(self) -> TraceParent:
        """A span of this trace whose parent is this one: same trace id and flags, a new span id."""
        return TraceParent(self.trace_id, _random_hex(8), self.flags)


def continue_trace(value: str | None) -> TraceParent:
    """A child span of ``value``'s trace, or the root of a new trace when ``value`` is absent or
    invalid (the W3C rule: a bad header restarts the trace, it never fails the request)."""
    parent = TraceParent.parse(value)
    return parent.child() if parent is not None else TraceParent.new()


def valid_traceparent(value: Any) -> str | None:
    """The normalised (version 00) form of ``value``, or None if it is not a traceparent.

    Used as a tolerant reader on the bus: a message whose trace context is broken is still a
    valid job or event, it only loses its place in the trace."""
    parent = TraceParent.parse(value) if isinstance(value, str) else None
    return None if parent is None else str(parent)


TraceParentField = Annotated[Annotated[str, Field(pattern=TRACEPARENT_PATTERN)] | None,
                             BeforeValidator(valid_traceparent),
                             Field(description="W3C Trace Context traceparent (version 00) of the span "
                                               "that made this message.")]
"""An optional traceparent field: invalid values are read as None, valid ones normalised."""


def _random_hex(size: int) -> str:
    while True:  # all zeros is the one invalid id
        value = secrets.token_hex(size)
        if value.strip("0"):
            return value
