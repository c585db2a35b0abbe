"""How a status event changes a job view: one plan, applied identically by every backend.

Ordering policy (the part every backend must agree on):

1. **Sequence order is authoritative per job.** An event whose ``sequence`` is greater than the
   view's ``last_sequence`` *advances* the view; anything else (a duplicate, or an event that
   arrives after a newer one) does not, and ``apply`` returns False. Advancing and recording
   the new position happen in one conditional write, so a redelivered event is a no-op.
2. **Terminal states are not special.** A higher sequence wins even over SUCCEEDED/FAILED/
   CANCELLED. This keeps the view a pure function of the *set* of events (it converges whatever
   the arrival order; "first terminal wins" would not), and a retried job, whose worker
   continues the sequence, is shown truthfully. Not publishing after a terminal state is the
   publisher's job.
3. **Order-free facts survive a late event.** A stale event still contributes what cannot go
   backward: the submission (request, submitted_at, source, trigger, traceparent), filled only while the
   view has none (a QUEUED overtaken by STARTING), and its per-epoch history entry, kept when
   newer than the stored one for that epoch. Both are conditional, idempotent writes.
4. **Fields.** ``state``, ``phase``, ``error`` and ``updated_at`` describe the newest event and
   are overwritten (``None`` included). Every other progress field (epoch, epochs, step,
   metrics, mlflow_run_id, model_version, model_alias, model_decision) keeps its last non-null
   value, so publishers repeat known facts on later events (see :mod:`schemas.events`).
   SUCCEEDED's metrics become both ``metrics`` and ``best_metrics``.
5. **A cancel request is recorded once, and never on a job that ended.** ``DELETE /train/{id}``
   sets ``cancel_requested_at``/``cancel_reason`` in one conditional write that matches only a
   view whose state is not terminal and that has no request yet (:func:`may_request_cancel`).
   No event touches those fields, so the record survives every later event, and a late DELETE
   can never turn a SUCCEEDED/FAILED job into anything else. The job's *state* still comes
   from events only: its worker publishes CANCELLED when it has stopped (rule 1 applies).
6. **``heard_at`` is when the projector heard from the job**, not the event's own time: every
   advancing write sets it to the writer's clock. The watchdog judges silence by it, so a
   backlog the projector is still working through, or a worker whose clock runs behind, never
   makes a live job look silent.
7. **Compare-and-set.** ``apply(event, expect_sequence=n)`` advances the view only while its
   ``last_sequence`` is exactly ``n`` (and never creates one): the watchdog's write of a job's
   next attempt, so that of two watchdogs that judged the same view stale exactly one wins, and
   a job that spoke after it was judged is left alone.
8. **``step_at`` is when the projector last saw the job move**: an advancing event sets it (the
   writer's clock) unless it repeats the view's ``state``, ``phase`` and ``step`` (an event
   without a step repeats any step). So it restarts with every new state, phase or attempt and
   with every step the trainer takes; a heartbeat of a training thread that hangs does not move
   it. The watchdog's measure of a stalled step (``CDTRAIN_STEP_STALL_S``). Both backends apply
   the rule as the filter :attr:`ViewUpdate.unmoved` (Mongo: a conditional update tried first).
9. **A claim is a lease.** A worker that takes a job writes its STARTING event to the view itself,
   with ``claim(event)``: one conditional write that advances the view only if the event is
   newer (rule 1) *and* the job has not ended; a missing view is created. The attempt that holds
   the job is the view's ``last_sequence // ATTEMPT_STRIDE`` (each attempt numbers its events
   from ``attempt * ATTEMPT_STRIDE``): a second delivery of the same attempt, an attempt that a
   newer one (or the watchdog) already replaced, and any attempt of a finished job are refused,
   so no job is trained by two owners at once or trained again once it ended. A running worker
   whose view has moved to a later attempt is superseded and stops (consumer/ownership.py).

Storage documents (shared by the Mongo and in-memory stores): the JobView fields, ``_id`` equal
to ``job_id``, and ``history`` as ``{"<epoch>": {"epoch", "sequence", "time", "metrics"}}`` so
that one epoch's entry can be set on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.events import STICKY_FIELDS, StatusEvent
from schemas.jobs import TERMINAL_STATES, JobPhase, JobState, JobView, utc_now


# Rule 5: the terminal states that refuse a cancel request, and the fields it sets.
_TERMINAL_VALUES = tuple(sorted(s.value for s in TERMINAL_STATES))


def cancel_fields(at: datetime, reason: str) -> dict[str, Any]:
    return {"cancel_requested_at": at, "cancel_reason": reason}


def may_claim(doc: dict[str, Any], sequence: int) -> bool:
    """Rule 9 on a stored document (the in-memory store; Mongo uses :func:`claim_filter`)."""
    return doc["last_sequence"] < sequence and doc.get("state") not in _TERMINAL_VALUES


def claim_filter(job_id: str, sequence: int) -> dict[str, Any]:
    """Rule 9 as a MongoDB filter; with ``upsert`` it creates a missing view."""
    return {"_id": job_id, "last_sequence": {"$lt": sequence}, "state": {"$nin": list(_TERMINAL_VALUES)}}


def acceptance_filter(job_id: str | list[str], attempt: int) -> dict[str, Any]:
    """Rule 11 as a MongoDB filter, for one job or several (``None`` also matches a missing
    field; explicit ``$and`` for nx-27017, see MongoJobViewStore.list)."""
    match_id = {"_id": {"$in": job_id}} if isinstance(job_id, list) else {"_id": job_id}
    return {"$and": [match_id, {"$or": [{"accepted_attempt": None}, {"accepted_attempt": {"$lt": attempt}}]}]}


def may_accept(doc: dict[str, Any], attempt: int) -> bool:
    """Rule 11 on a stored document (the in-memory store)."""
    return doc.get("accepted_attempt") is None or doc["accepted_attempt"] < attempt


def may_request_cancel(doc: dict[str, Any]) -> bool:
    """Rule 5 on a stored document (the in-memory store; Mongo uses :func:`cancel_filter`)."""
    return doc.get("state") not in _TERMINAL_VALUES and doc.get("cancel_requested_at") is None


def cancel_filter(job_id: str) -> dict[str, Any]:
    """Rule 5 as a MongoDB filter (``None`` also matches a missing field)."""
    return {"$and": [{"_id": job_id}, {"state": {"$nin": list(_TERMINAL_VALUES)}},
                     {"cancel_requested_at": None}]}


class InvalidCursor(ValueError):
    """A list cursor that this store did not produce (or that was tampered with)."""


@dataclass(frozen=True)
class HistoryEntry:
    epoch: int
    sequence: int
    doc: dict[str, Any]


@dataclass(frozen=True)
class ViewUpdate:
    """What one event does to the stored document of its job."""

    job_id: str
    sequence: int
    advance: dict[str, Any]  # set when the event is newer than the view (incl. last_sequence)
    on_insert: dict[str, Any] = field(default_factory=dict)  # only when the event creates the view
    submission: dict[str, Any] | None = None  # set when newer, else filled if the view has none
    history: HistoryEntry | None = None  # set when newer than the stored entry for its epoch
    # Rule 8: the stored fields that, all equal, mean the event does not move the job; a newer
    # event that does also sets ``step_at`` (the ``moved`` fields).
    unmoved: dict[str, Any] = field(default_factory=dict)
    moved: dict[str, Any] = field(default_factory=dict)


def is_unmoved(doc: dict[str, Any], plan: ViewUpdate) -> bool:
    """Rule 8 on a stored document (Mongo matches :attr:`ViewUpdate.unmoved` as a filter)."""
    return all(doc.get(name) == value for name, value in plan.unmoved.items())


def plan_update(event: StatusEvent) -> ViewUpdate:
    data = event.data
    advance: dict[str, Any] = {
        "job_id": data.job_id,
        "state": data.state.value,
        "phase": data.phase.value if data.phase else None,
        # A FAILED/CANCELLED reason, or a note on a re-queued job (the watchdog says why).
        "error": data.error,
        "updated_at": event.time,
        "heard_at": utc_now(),  # rule 6
        "last_sequence": data.sequence,
    }
    for name in STICKY_FIELDS:
        value = getattr(data, name)
        if value is not None:
            advance[name] = value
    if data.metrics is not None:
        advance["metrics"] = dict(data.metrics)
        if data.state is JobState.SUCCEEDED:
            advance["best_metrics"] = dict(data.metrics)

    unmoved: dict[str, Any] = {"state": advance["state"], "phase": advance["phase"]}
    if data.step is not None:
        unmoved["step"] = data.step
    moved = {"step_at": advance["heard_at"]}

    submission = None
    on_insert: dict[str, Any] = {}
    if data.request is not None:
        submission = {
            "request": data.request.model_dump(mode="json"),
            "submitted_at": data.submitted_at or event.time,
            "source": data.source,
            "trigger": data.trigger.model_dump() if data.trigger else None,
            "model_name": data.request.model_name,
            # The submission's trace: a watchdog's re-queue continues it (schemas/tracing.py).
            "traceparent": event.traceparent,
        }
    else:
        # Until the QUEUED event is seen the view still needs a position in the newest-first
        # listing: the first event's time stands in for submitted_at.
        on_insert["submitted_at"] = event.time

    history = None
    if (
        data.state is JobState.RUNNING
        and data.epoch is not None
        and data.metrics is not None
        and data.phase in (None, JobPhase.TRAINING)
    ):
        history = HistoryEntry(
            epoch=data.epoch,
            sequence=data.sequence,
            doc={"epoch": data.epoch, "sequence": data.sequence, "time": event.time, "metrics": dict(data.metrics)},
        )
    return ViewUpdate(
        job_id=data.job_id,
        sequence=data.sequence,
        advance=advance,
        on_insert=on_insert,
        submission=submission,
        history=history,
        unmoved=unmoved,
        moved=moved,
    )


def doc_to_view(doc: dict[str, Any]) -> JobView:
    history = sorted((doc.get("history") or {}).values(), key=lambda h: h["epoch"])
    return JobView.model_validate(
        {
            **doc,
            "job_id": doc["_id"],
            "history": [{"epoch": h["epoch"], "metrics": h["metrics"], "time": h.get("time")} for h in history],
        }
    )


def check_limit(limit: int, maximum: int = 1000) -> int:
    if not 1 <= limit <= maximum:
        raise ValueError(f"limit must be between 1 and {maximum}, got {limit}")
    return limit
