"""Job status events, as CloudEvents 1.0 in structured JSON mode.

One event per job state change or progress report, published on the status topic exchange with
routing key ``job.<job_id>.<state>`` (:func:`status_routing_key`), so a subscriber can bind to
``job.<id>.#`` (one job), ``job.*.failed`` (all failures) or ``#`` (everything).

Envelope attributes:

- ``type`` is ``io.cdtrain.job.<state>`` with ``<state>`` a lower-case :class:`JobState` value,
  e.g. ``io.cdtrain.job.running``; ``subject`` is the job id.
- ``source`` names the emitting process: ``/cdtrain/<role>/<host>`` (:func:`event_source`),
  e.g. ``/cdtrain/worker/gpu-node-3`` or ``/cdtrain/ingress/api-0``.
- ``id`` is unique per event (a UUID); redelivering the same event keeps its id.
- ``dataschema`` names the JSON Schema of ``data`` and its version (:data:`STATUS_DATA_SCHEMA`);
  the ingress serves that schema at :data:`STATUS_DATA_SCHEMA_PATH`.
- ``traceparent`` (the CloudEvents distributed-tracing extension) is the W3C trace context of the
  span that made the event, in the trace of the POST that submitted the job (schemas/tracing.py).

On the bus every event travels in structured mode: the body is this envelope and the AMQP
content type is :data:`CLOUDEVENTS_CONTENT_TYPE` (the bus sets it, infra/bus/codec.py), so a
CloudEvents SDK reads it as is. Events an older producer published as ``application/json`` have
the same body (without ``dataschema`` and ``traceparent``) and read the same here.

``data`` (:class:`StatusData`) carries ``sequence``: per job, strictly increasing across every
publisher of that job (the ingress emits QUEUED with 0, the worker continues from 1). Consumers
order by it; the view projector ignores anything not newer than what it has applied.

Conventions the projector relies on:

- QUEUED carries the ``request`` (plus ``submitted_at``, ``source``, ``trigger``).
- A RUNNING event with ``epoch`` and ``metrics`` in phase ``training`` (or no phase) reports that
  epoch's metrics; the newest such event per epoch is the epoch's entry in the job's history.
- Facts known so far (``epochs``, ``mlflow_run_id``, later ``model_version``) should be repeated
  on every later event: a view keeps the last known value, and an event dropped as stale (it
  arrived after a newer one) then loses nothing.
- SUCCEEDED's ``metrics`` are the job's best/final metrics; FAILED/CANCELLED carry ``error``.
  A SUCCEEDED job that registered a model carries ``model_version``, ``model_alias`` and
  ``model_decision``: why that version was (not) promoted to production, in words.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from schemas.redact import redact_credentials
from schemas.tracing import TraceParent, TraceParentField
from schemas.jobs import (
    JOB_ID_PATTERN,
    BucketTrigger,
    JobPhase,
    JobSource,
    JobState,
    Metrics,
    TrainJob,
    TrainRequest,
    UtcDatetime,
    utc_now,
)

CLOUDEVENTS_SPEC_VERSION = "1.0"
EVENT_TYPE_PREFIX = "io.cdtrain.job."
# Content type of a structured-mode CloudEvent message (the AMQP content_type to publish with).
CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"

# The schema of StatusData. Its version moves only with a change an older reader would misread
# (a field removed, renamed or retyped); added optional fields keep it, since readers ignore
# what they do not know. A URN, not a URL: every deployment serves the document at
# STATUS_DATA_SCHEMA_PATH of its own ingress, with this URN as its ``$id``.
STATUS_DATA_SCHEMA_VERSION = 1
STATUS_DATA_SCHEMA = f"urn:cdtrain:schema:status-event-data:v{STATUS_DATA_SCHEMA_VERSION}"
STATUS_DATA_SCHEMA_PATH = "/schemas/status-event-data.json"


def event_type(state: JobState | str) -> str:
    """``io.cdtrain.job.<state>``, e.g. ``io.cdtrain.job.succeeded``."""
    return EVENT_TYPE_PREFIX + JobState(state).value


def status_routing_key(job_id: str, state: JobState | str) -> str:
    """``job.<job_id>.<state>``, e.g. ``job.3f2a….running``."""
    if "." in job_id or "*" in job_id or "#" in job_id:
        raise ValueError(f"job id {job_id!r} cannot be used in a routing key")
    return f"job.{job_id}.{JobState(state).value}"


def event_source(role: str, host: str) -> str:
    """The CloudEvents ``source`` of a process: ``/cdtrain/<role>/<host>``."""
    return f"/cdtrain/{role}/{host}"


# Fields of a job's status that keep their last non-null value from one event to the next (the
# projector's views, the worker's publisher and the client's live summary all follow this).
STICKY_FIELDS = ("epoch", "epochs", "step", "mlflow_run_id", "model_version", "model_alias", "model_decision")


def _redacted(text: str | None) -> str | None:
    return None if text is None else redact_credentials(text)


class StatusData(BaseModel):
    """The payload of a status event (``data``); see the module docstring for conventions."""

    # Tolerant reader: an older projector must accept events from a newer worker.
    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    sequence: int = Field(ge=0)
    state: JobState
    phase: JobPhase | None = None
    epoch: int | None = Field(None, ge=0)
    epochs: int | None = Field(None, ge=1)
    step: int | None = Field(None, ge=0)
    metrics: Metrics | None = None
    # Public (events and job views): whatever raised it, no credential leaves in it.
    error: Annotated[str | None, AfterValidator(_redacted)] = None
    mlflow_run_id: str | None = None
    model_version: str | None = None
    model_alias: str | None = None
    model_decision: str | None = None  # the registry's promotion reason, on SUCCEEDED
    # Carried on QUEUED so the view can hold the request without another lookup.
    request: TrainRequest | None = None
    submitted_at: UtcDatetime | None = None
    source: JobSource | None = None
    trigger: BucketTrigger | None = None


class StatusEvent(BaseModel):
    """A CloudEvents 1.0 envelope around :class:`StatusData` (structured JSON mode)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    specversion: Literal["1.0"] = CLOUDEVENTS_SPEC_VERSION
    id: str = Field(default_factory=lambda: str(uuid.uuid4()), min_length=1)
    source: str = Field(min_length=1)
    type: str
    subject: str
    time: UtcDatetime = Field(default_factory=utc_now)
    datacontenttype: Literal["application/json"] = "application/json"
    # Events of producers older than the field are read with it too: their data is version 1's.
    dataschema: str = STATUS_DATA_SCHEMA
    # CloudEvents distributed-tracing extension; None on events from before it (tolerant reader).
    traceparent: TraceParentField = None
    data: StatusData

    @model_validator(mode="before")
    @classmethod
    def _derive_type_and_subject(cls, values: Any) -> Any:
        # type and subject are functions of data; fill them when a producer leaves them out.
        if isinstance(values, dict) and isinstance(values.get("data"), (dict, StatusData)):
            data = values["data"]
            get = data.get if isinstance(data, dict) else lambda k: getattr(data, k, None)
            values = dict(values)
            if "type" not in values and get("state") is not None:
                try:
                    values["type"] = event_type(get("state"))
                except ValueError:
                    pass  # left for field validation to report against data.state
            values.setdefault("subject", get("job_id"))
        return values

    @model_validator(mode="after")
    def _consistent(self) -> "StatusEvent":
        if self.type != event_type(self.data.state):
            raise ValueError(f"type {self.type!r} does not match data.state {self.data.state.value!r}")
        if self.subject != self.data.job_id:
            raise ValueError(f"subject {self.subject!r} does not match data.job_id {self.data.job_id!r}")
        return self

    @classmethod
    def for_job(
        cls,
        job_id: str,
        sequence: int,
        state: JobState | str,
        *,
        source: str,
        phase: JobPhase | str | None = None,
        epoch: int | None = None,
        epochs: int | None = None,
        step: int | None = None,
        metrics: dict[str, float] | None = None,
        error: str | None = None,
        mlflow_run_id: str | None = None,
        model_version: str | None = None,
        model_alias: str | None = None,
        model_decision: str | None = None,
        request: TrainRequest | None = None,
        submitted_at: Any = None,
        job_source: JobSource | None = None,
        trigger: BucketTrigger | None = None,
        time: Any = None,
        event_id: str | None = None,
        traceparent: TraceParent | str | None = None,
    ) -> "StatusEvent":
        """Build a validated event; ``type``, ``subject``, ``id`` and ``time`` are filled in."""
        data = StatusData(
            job_id=job_id,
            sequence=sequence,
            state=JobState(state),
            phase=None if phase is None else JobPhase(phase),
            epoch=epoch,
            epochs=epochs,
            step=step,
            metrics=metrics,
            error=error,
            mlflow_run_id=mlflow_run_id,
            model_version=model_version,
            model_alias=model_alias,
            model_decision=model_decision,
            request=request,
            submitted_at=submitted_at,
            source=job_source,
            trigger=trigger,
        )
        envelope: dict[str, Any] = {"source": source, "data": data}
        if traceparent is not None:
            envelope["traceparent"] = str(traceparent)
        if time is not None:
            envelope["time"] = time
        if event_id is not None:
            envelope["id"] = event_id
        return cls.model_validate(envelope)

    @classmethod
    def queued(cls, job: TrainJob, *, source: str, sequence: int = 0) -> "StatusEvent":
        """The QUEUED event for an accepted job, carrying everything the view needs from it."""
        return cls.for_job(
            job.job_id,
            sequence,
            JobState.QUEUED,
            source=source,
            request=job.request,
            submitted_at=job.submitted_at,
            job_source=job.source,
            trigger=job.trigger,
            time=job.submitted_at,
            traceparent=job.traceparent,
        )

    @property
    def job_id(self) -> str:
        return self.data.job_id

    @property
    def sequence(self) -> int:
        return self.data.sequence

    @property
    def state(self) -> JobState:
        return self.data.state

    @property
    def routing_key(self) -> str:
        return status_routing_key(self.data.job_id, self.data.state)

    def to_json_bytes(self) -> bytes:
        """The structured-mode body (publish with content type :data:`CLOUDEVENTS_CONTENT_TYPE`)."""
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_json(cls, body: bytes | str) -> "StatusEvent":
        return cls.model_validate_json(body)


def status_data_json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of :class:`StatusData`, the document ``dataschema`` names."""
    schema = StatusData.model_json_schema(mode="serialization")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": STATUS_DATA_SCHEMA, **schema}
