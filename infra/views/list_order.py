"""The order of ``GET /train`` as one sortable value per view, and the cursors over it.

Jobs are listed newest first by ``(submitted_at, job_id)``. Both parts are folded into one string,
the view's ``list_key``, that sorts exactly like the pair (``20250301T120000.000Z|job-7``): a
fixed-width UTC time at millisecond precision (what MongoDB stores), then the job id. A cursor is
then a single range on one indexed field (``list_key < last``), which any MongoDB-protocol server
serves from the index; the ``$or`` of two comparisons that a pair needs is not (nx-27017 scans).

The time is written in ISO 8601's *basic* form (no ``-`` or ``:``) on purpose: nx-27017 takes any
string that starts like an extended ISO date (``2025-03-01T…``) for a datetime and compares it as
one, which breaks a string range. Fixed width covers every ``datetime`` (years 1–9999), so the
string order is the time order; job ids are ASCII and come last, so ties go by job id, as before.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime, timezone
from typing import Any

from infra.views.merge import InvalidCursor

LIST_KEY = "list_key"
"""The stored field (Mongo); derived from ``submitted_at`` and the job id, set with them."""

_KEY = re.compile(r"\d{8}T\d{6}\.\d{3}Z\|.+", re.DOTALL)


def list_key(submitted_at: datetime, job_id: str) -> str:
    """The view's position in the list. Naive times are taken as UTC (as :data:`schemas.jobs.UtcDatetime`
    does); microseconds are dropped, as MongoDB drops them."""
    t = submitted_at if submitted_at.tzinfo is None else submitted_at.astimezone(timezone.utc)
    # Formatted by hand: strftime("%Y") does not zero-pad years below 1000 on every platform.
    return (f"{t.year:04d}{t.month:02d}{t.day:02d}T{t.hour:02d}{t.minute:02d}{t.second:02d}"
            f".{t.microsecond // 1000:03d}Z|{job_id}")


def with_list_key(fields: dict[str, Any], job_id: str) -> dict[str, Any]:
    """``fields`` plus the matching ``list_key`` when they set ``submitted_at``: the key must change
    in the same write as the time (a late QUEUED event replaces a stand-in ``submitted_at``)."""
    submitted_at = fields.get("submitted_at")
    if not isinstance(submitted_at, datetime):
        return fields
    return {**fields, LIST_KEY: list_key(submitted_at, job_id)}


# --- cursors: opaque to clients, base64 of {"k": list_key} of the page's last view -------------------


def encode_cursor(key: str) -> str:
    raw = json.dumps({"k": key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The ``list_key`` a cursor points after. Cursors of the earlier form (``{"t": submitted_at,
    "j": job_id}``) still work: they name the same position. Anything else is
    :class:`~infra.views.merge.InvalidCursor`."""
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidCursor(f"invalid cursor {cursor!r}: use the next_cursor of a previous page") from None
    if isinstance(values, dict) and "k" in values:
        key = values["k"]
        if isinstance(key, str) and _KEY.fullmatch(key):
            return key
    elif isinstance(values, dict) and "t" in values:
        try:
            submitted_at, job_id = datetime.fromisoformat(values["t"]), values.get("j")
        except (TypeError, ValueError):
            raise InvalidCursor(f"invalid cursor {cursor!r}: use the next_cursor of a previous page") from None
        if submitted_at.tzinfo is not None and isinstance(job_id, str):
            return list_key(submitted_at, job_id)
    raise InvalidCursor(f"invalid cursor {cursor!r}: use the next_cursor of a previous page")
