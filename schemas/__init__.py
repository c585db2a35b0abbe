"""Pydantic v2 contracts shared by every process (no I/O, no project imports outside schemas)."""

from schemas.bucket_events import BucketEventError, ObjectCreated, parse_bucket_event
from schemas.events import (
    CLOUDEVENTS_CONTENT_TYPE,
    EVENT_TYPE_PREFIX,
    StatusData,
    StatusEvent,
    event_source,
    event_type,
    status_routing_key,
)
from schemas.jobs import (
    JOB_ID_PATTERN,
    TERMINAL_STATES,
    BucketTrigger,
    EpochMetrics,
    JobPhase,
    JobSource,
    JobState,
    JobView,
    TrainJob,
    TrainRequest,
    UtcDatetime,
    new_job_id,
    split_s3_uri,
    utc_now,
)
from schemas.training import ConfigError, TrainConfig, describe_validation_error

__all__ = [
    "CLOUDEVENTS_CONTENT_TYPE",
    "EVENT_TYPE_PREFIX",
    "JOB_ID_PATTERN",
    "TERMINAL_STATES",
    "BucketEventError",
    "BucketTrigger",
    "ConfigError",
    "EpochMetrics",
    "JobPhase",
    "JobSource",
    "JobState",
    "JobView",
    "ObjectCreated",
    "StatusData",
    "StatusEvent",
    "TrainConfig",
    "TrainJob",
    "TrainRequest",
    "UtcDatetime",
    "describe_validation_error",
    "event_source",
    "event_type",
    "new_job_id",
    "parse_bucket_event",
    "split_s3_uri",
    "status_routing_key",
    "utc_now",
]
