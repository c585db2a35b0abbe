"""Job contracts: the train request a user submits, the job that travels on the bus, the read model.

``TrainRequest`` is user input (REST body or a bucket trigger), so it forbids unknown keys and
validates its config overrides with :class:`~schemas.training.TrainConfig` up front: a bad key is
rejected at the edge instead of hours later on a GPU worker.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from schemas.redact import redact_credentials
from schemas.tracing import TraceParentField
from schemas.training import ConfigError, TrainConfig

# A job id travels inside AMQP topic routing keys (``job.<id>.<state>``), so no dots, ``*`` or ``#``.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# MLflow accepts almost anything as a registered model name; we keep URL- and path-safe names.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")

# Namespace for job ids derived from idempotency keys (uuid5): stable across processes and releases.
_IDEMPOTENCY_NAMESPACE = uuid.UUID("5b0f3a52-8d7e-4f0c-9a51-6a1f3c2d9e44")


def _to_utc_ms(value: datetime) -> datetime:
    # Naive datetimes are taken as UTC. Truncated to milliseconds because that is what MongoDB
    # stores: every backend then round-trips a view exactly, and list cursors compare equal.
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    value = value.astimezone(timezone.utc)
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


UtcDatetime = Annotated[datetime, AfterValidator(_to_utc_ms)]
"""A timezone-aware UTC datetime at millisecond precision (naive input is taken as UTC)."""


def utc_now() -> datetime:
    """Now, in UTC, at millisecond precision (see :data:`UtcDatetime`)."""
    return _to_utc_ms(datetime.now(timezone.utc))


def _finite_or_none(values: Any) -> Any:
    # JSON has no NaN/Infinity and MongoDB-compatible stores may refuse them (nx-27017 does):
    # a diverged loss is recorded as null rather than breaking the event or the view.
    if isinstance(values, dict):
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()
        }
    return values


Metrics = Annotated[dict[str, float | None], BeforeValidator(_finite_or_none)]
"""Metric name -> value; non-finite values become ``None``."""


def new_job_id(idempotency_key: str | None = None) -> str:
    """A fresh job id, or the one id an idempotency key always maps to.

    Deriving the id from the key lets two racing submissions with the same key collapse onto
    one job (both write the same view) instead of needing a unique index to arbitrate.
    """
    if idempotency_key is not None:
        return uuid.uuid5(_IDEMPOTENCY_NAMESPACE, idempotency_key).hex
    return uuid.uuid4().hex


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; raises ValueError otherwise."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    # Loose on purpose (legacy AWS names, moto and MinIO differ); S3 itself rejects bad names.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
        raise ValueError(f"invalid bucket name {bucket!r} in {uri!r}")
    return bucket, key


def _check_location(uri: str) -> str:
    uri = uri.strip()
    if not uri:
        raise ValueError("must not be empty")
    if redact_credentials(uri) != uri:
        # A presigned URL or a password would travel in events, views and MLflow params.
        raise ValueError("holds a credential (a presigned URL's signature or a password): give the "
                         "s3://bucket/key location; the workers read it with their own credentials")
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return uri  # a local path (embedded mode)
    if scheme == "s3":
        split_s3_uri(uri)
        return uri
    if scheme == "file":
        if len(uri) <= len("file://"):
            raise ValueError(f"file:// URI without a path: {uri!r}")
        return uri
    raise ValueError(f"unsupported scheme {scheme!r}: use s3://bucket/prefix, file:///path or a local path")


# A job's deadline (TrainRequest.deadline_s): a server default (CDTRAIN_JOB_DEADLINE_S), at most this.
DEFAULT_DEADLINE_S = 7 * 24 * 3600
MAX_DEADLINE_S = 90 * 24 * 3600


class TrainRequest(BaseModel):
    """What a user asks for: train on this dataset, with these config overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), json_schema_extra={
        # In the OpenAPI document (GET /openapi.json): a request a client can copy.
        "examples": [{"dataset_uri": "s3://lake/datasets/levir-cd/", "config": {"epochs": 50, "lr": 0.0005},
                      "register_model": True, "idempotency_key": "levir-2026-11-27"}],
    })

    dataset_uri: str = Field(
        description="s3://bucket/prefix (a dataset layout) or s3://bucket/key.zip|.tar.gz (one "
        "archive); file:///path or a plain local path in the embedded one-machine mode."
    )
    config_uri: str | None = Field(None, description="A YAML training config (same URI forms).")
    # Strict, as the JSON schema says: 0, "no" or "true" is a client's mistake, not a boolean.
    register_model: bool = Field(False, strict=True)
    config: dict[str, Any] | None = Field(
        None, description="TrainConfig overrides (only the keys that change), applied over config_uri."
    )
    model_name: str = Field("snunet-cbam", pattern=MODEL_NAME_PATTERN)
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)
    deadline_s: int | None = Field(
        None, ge=60, le=MAX_DEADLINE_S, strict=True,  # "3600" (or 3600.0) is refused, not coerced
        description="Seconds from submission after which the job is ended FAILED wherever it is "
        "(queued or training), its worker told to stop. Default: the server's CDTRAIN_JOB_DEADLINE_S "
        "(7 days). At most 90 days.",
    )

    @field_validator("dataset_uri", "config_uri")
    @classmethod
    def _location(cls, value: str | None) -> str | None:
        return None if value is None else _check_location(value)

    @field_validator("config")
    @classmethod
    def _overrides(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                TrainConfig.from_mapping(value)
            except ConfigError as exc:
                # ConfigError's message names the bad key; ValueError makes pydantic report it
                # under loc ("config",).
                raise ValueError(str(exc)) from None
        return value

    @property
    def dataset_is_archive(self) -> bool:
        return self.dataset_uri.lower().endswith(ARCHIVE_SUFFIXES)

    def train_config(self, base: TrainConfig | None = None) -> TrainConfig:
        """The effective config: these overrides over ``base`` (e.g. loaded from ``config_uri``)."""
        return TrainConfig.from_mapping(self.config, base)


# A job's attempts: events of attempt n are numbered from n * ATTEMPT_STRIDE, so every retry
# (re-queued by a worker shutdown or the watchdog, or re-submitted after a request the broker did
# not confirm) moves the job's view forward. The request of attempt n carries ATTEMPT_HEADER = n.
ATTEMPT_STRIDE = 1_000_000
ATTEMPT_HEADER = "x-cdtrain-attempt"


def attempt_of(sequence: int) -> int:
    """The attempt an event (or a view's ``last_sequence``) belongs to."""
    return sequence // ATTEMPT_STRIDE


# The FAILED reason of a submission whose request the broker did not confirm: nothing ran, and a
# retry with the same idempotency key starts the job afresh.
NOT_ACCEPTED = "not accepted"


class _AnyCaseEnum(StrEnum):
    @classmethod
    def _missing_(cls, value: object) -> "_AnyCaseEnum | None":
        # Accept "RUNNING" as well as "running" (query strings, enum names in configs).
        if isinstance(value, str):
            return cls.__members__.get(value.upper())
        return None


class JobState(_AnyCaseEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobPhase(_AnyCaseEnum):
    DOWNLOADING = "downloading"
    TRAINING = "training"
    EVALUATING = "evaluating"
    REGISTERING = "registering"


JobSource = Literal["api", "bucket"]


class BucketTrigger(BaseModel):
    """The bucket object whose creation submitted a job."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    bucket: str
    key: str
    etag: str | None = None
    version_id: str | None = None
    sequencer: str | None = None
    event_time: UtcDatetime | None = None


class TrainJob(BaseModel):
    """The command on the bus: one accepted request, with the id every status event refers to."""

    # Tolerant reader: during a rolling deploy a newer ingress may add fields an older worker
    # doesn't know; the user-facing TrainRequest inside stays strict.
    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str = Field(default_factory=new_job_id, pattern=JOB_ID_PATTERN)
    request: TrainRequest
    submitted_at: UtcDatetime = Field(default_factory=utc_now)
    source: JobSource = "api"
    trigger: BucketTrigger | None = None
    # The ingress's span of the submission (schemas/tracing.py); a worker's events continue it.
    traceparent: TraceParentField = None


class EpochMetrics(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    epoch: int = Field(ge=0)
    metrics: Metrics
    time: UtcDatetime | None = None


class JobView(BaseModel):
    """The read model served by GET /train[/{id}]: the projection of a job's status events.

    ``request``/``submitted_at``/``source`` come from the QUEUED event; until it has been
    projected (events can arrive out of order) ``request`` is None and ``submitted_at`` is the
    time of the first event seen.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())

    job_id: str
    state: JobState
    phase: JobPhase | None = None
    request: TrainRequest | None = None
    submitted_at: UtcDatetime
    updated_at: UtcDatetime
    # When the projector last heard from the job (its clock, not the event's time): the
    # watchdog's measure of silence. None on views projected before this field existed.
    heard_at: UtcDatetime | None = None
    # When the projector last saw the job move: a new state, phase or step (infra/views/merge.py
    # rule 8). A training job whose step_at is old is stalled, however often it beats.
    step_at: UtcDatetime | None = None
    last_sequence: int = Field(ge=0)
    source: JobSource | None = None
    trigger: BucketTrigger | None = None
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    metrics: Metrics | None = None
    best_metrics: Metrics | None = None
    error: str | None = None
    mlflow_run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    model_alias: str | None = None
    # Why model_version was (not) promoted to production, in words (e.g. "below the quality gate: ...").
    model_decision: str | None = None
    # Set once by DELETE /train/{id} while the job had not ended (infra/views/merge.py); the job
    # is CANCELLED when its worker (or the worker that claims it) has stopped it.
    cancel_requested_at: UtcDatetime | None = None
    cancel_reason: str | None = None
    # The newest attempt whose request the broker confirmed (infra/views/merge.py rule 11); a
    # QUEUED view above it has a request that may not be in the queue, and is published again.
    accepted_attempt: int | None = None
    # The job's trace: the span of its newest event that carried the request (the submission's,
    # then its attempts'); a re-queued attempt continues it, so every attempt is in one trace.
    traceparent: TraceParentField = None
    history: list[EpochMetrics] = Field(default_factory=list)
