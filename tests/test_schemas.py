"""Contracts: validation names the offending field, JSON round-trips, CloudEvents attributes."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from schemas import (
    CLOUDEVENTS_CONTENT_TYPE,
    JOB_ID_PATTERN,
    BucketTrigger,
    JobPhase,
    JobState,
    JobView,
    StatusData,
    StatusEvent,
    TrainConfig,
    TrainJob,
    TrainRequest,
    event_source,
    event_type,
    new_job_id,
    split_s3_uri,
    status_routing_key,
)

SOURCE = event_source("worker", "gpu-node-3")
T0 = datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)


def _locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


# --- TrainRequest ----------------------------------------------------------------------------


def test_train_request_defaults() -> None:
    req = TrainRequest(dataset_uri="s3://datasets/levir-cd/")
    assert req.config_uri is None
    assert req.register_model is False
    assert req.config is None
    assert req.model_name == "snunet-cbam"
    assert req.idempotency_key is None
    assert req.dataset_is_archive is False


@pytest.mark.parametrize(
    "uri",
    [
        "s3://datasets/levir-cd",
        "s3://datasets/levir-cd/tiles/",
        "s3://datasets/levir.zip",
        "s3://datasets/archives/levir.tar.gz",
        "file:///data/levir-cd",
        "/data/levir-cd",
        "data/levir-cd.zip",
    ],
)
def test_train_request_accepts_dataset_locations(uri: str) -> None:
    assert TrainRequest(dataset_uri=uri).dataset_uri == uri


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("http://example.com/levir.zip", "unsupported scheme 'http'"),
        ("gs://bucket/levir", "unsupported scheme 'gs'"),
        ("s3:///no-bucket", "invalid bucket name"),
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("file://", "without a path"),
    ],
)
def test_train_request_rejects_bad_dataset_uri(uri: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainRequest(dataset_uri=uri)
    assert _locs(info.value) == ["dataset_uri"]
    assert fragment in str(info.value)


def test_train_request_archive_detection() -> None:
    assert TrainRequest(dataset_uri="s3://b1/x/levir.ZIP").dataset_is_archive
    assert TrainRequest(dataset_uri="s3://b1/x/levir.tar.gz").dataset_is_archive
    assert not TrainRequest(dataset_uri="s3://b1/x/levir/").dataset_is_archive


def test_train_request_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ValidationError) as info:
        TrainRequest.model_validate({"dataset_uri": "s3://b1/x", "epochs": 3})
    assert _locs(info.value) == ["epochs"]
    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_train_request_config_unknown_key_is_named() -> None:
    with pytest.raises(ValidationError) as info:
        TrainRequest(dataset_uri="s3://b1/x", config={"epochz": 3})
    assert _locs(info.value) == ["config"]
    assert "unknown key 'epochz'" in str(info.value)


def test_train_request_config_bad_value_is_named() -> None:
    with pytest.raises(ValidationError) as info:
        TrainRequest(dataset_uri="s3://b1/x", config={"epochs": 0, "lr": 1e-3})
    message = info.value.errors()[0]["msg"]
    assert _locs(info.value) == ["config"]
    assert "invalid value for 'epochs'" in message
    assert "'lr'" not in message  # only the bad key is reported


def test_train_request_config_cross_field_rule() -> None:
    with pytest.raises(ValidationError, match="window_overlap must be smaller"):
        TrainRequest(dataset_uri="s3://b1/x", config={"window_size": 64, "window_overlap": 64})


def test_train_request_effective_config_applies_overrides_over_base() -> None:
    base = TrainConfig.from_mapping({"batch_size": 2, "epochs": 7})
    req = TrainRequest(dataset_uri="s3://b1/x", config={"epochs": 3})
    cfg = req.train_config(base)
    assert (cfg.epochs, cfg.batch_size) == (3, 2)
    assert TrainRequest(dataset_uri="s3://b1/x").train_config().epochs == TrainConfig().epochs


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "slash/name", "x" * 129, "dollar$"])
def test_train_request_model_name_charset(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainRequest(dataset_uri="s3://b1/x", model_name=name)
    assert _locs(info.value) == ["model_name"]


def test_train_request_model_name_allowed() -> None:
    assert TrainRequest(dataset_uri="s3://b1/x", model_name="levir_cd.v2-c16").model_name == "levir_cd.v2-c16"


def test_train_request_json_round_trip() -> None:
    req = TrainRequest(
        dataset_uri="s3://datasets/levir.zip",
        config_uri="s3://configs/levir.yaml",
        register_model=True,
        config={"epochs": 5, "base_channel": 16},
        model_name="levir-cd",
        idempotency_key="upload-42",
    )
    again = TrainRequest.model_validate_json(req.model_dump_json())
    assert again == req
    assert again.config == {"epochs": 5, "base_channel": 16}


def test_split_s3_uri() -> None:
    assert split_s3_uri("s3://datasets/a/b.zip") == ("datasets", "a/b.zip")
    assert split_s3_uri("s3://datasets") == ("datasets", "")
    with pytest.raises(ValueError, match="not an s3://"):
        split_s3_uri("file:///x")


# --- states, jobs, ids ---------------------------------------------------------------------------


def test_job_state_terminal() -> None:
    terminal = {s for s in JobState if s.is_terminal}
    assert terminal == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def test_job_state_and_phase_parse_either_case() -> None:
    assert JobState("RUNNING") is JobState.RUNNING
    assert JobState("running") is JobState.RUNNING
    assert JobPhase("Training") is JobPhase.TRAINING
    with pytest.raises(ValueError):
        JobState("paused")
    assert [p.value for p in JobPhase] == ["downloading", "training", "evaluating", "registering"]


def test_new_job_id_is_routing_safe_and_unique() -> None:
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(JOB_ID_PATTERN, i) for i in ids)


def test_new_job_id_from_idempotency_key_is_stable() -> None:
    assert new_job_id("upload-42") == new_job_id("upload-42")
    assert new_job_id("upload-42") != new_job_id("upload-43")
    assert re.fullmatch(JOB_ID_PATTERN, new_job_id("s3://b/k.zip#etag"))


def test_train_job_round_trip_and_utc_normalisation() -> None:
    naive = datetime(2025, 3, 1, 12, 0, 0, 123456)
    job = TrainJob(
        request=TrainRequest(dataset_uri="s3://datasets/levir.zip"),
        submitted_at=naive,
        source="bucket",
        trigger=BucketTrigger(bucket="datasets", key="levir.zip", etag="abc", event_time=naive),
    )
    # Naive is taken as UTC, and truncated to the millisecond MongoDB keeps.
    assert job.submitted_at == datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)
    again = TrainJob.model_validate_json(job.model_dump_json())
    assert again == job
    offset = datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert TrainJob(request=job.request, submitted_at=offset).submitted_at == datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def test_train_job_rejects_job_id_unsafe_for_routing_keys() -> None:
    with pytest.raises(ValidationError) as info:
        TrainJob(job_id="a.b", request=TrainRequest(dataset_uri="s3://b1/x"))
    assert _locs(info.value) == ["job_id"]


def test_train_job_tolerates_unknown_envelope_fields_but_not_request_fields() -> None:
    body = {"job_id": "j1", "request": {"dataset_uri": "s3://b1/x"}, "submitted_at": T0.isoformat(), "added_later": 1}
    assert TrainJob.model_validate(body).job_id == "j1"
    body["request"] = {"dataset_uri": "s3://b1/x", "surprise": 1}
    with pytest.raises(ValidationError) as info:
        TrainJob.model_validate(body)
    assert _locs(info.value) == ["request.surprise"]


# --- status events ---------------------------------------------------------------------------------


def test_status_event_for_job_fills_cloudevents_attributes() -> None:
    event = StatusEvent.for_job("job-1", 3, JobState.RUNNING, source=SOURCE, phase="training", epoch=2, epochs=10,
                                metrics={"val_f1": 0.81})
    assert event.specversion == "1.0"
    assert event.type == "io.cdtrain.job.running"
    assert event.subject == "job-1"
    assert event.source == "/cdtrain/worker/gpu-node-3"
    assert event.datacontenttype == "application/json"
    assert uuid.UUID(event.id).version == 4
    assert event.time.tzinfo is not None and event.time.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - event.time) < timedelta(seconds=5)
    assert (event.job_id, event.sequence, event.state) == ("job-1", 3, JobState.RUNNING)
    assert event.data.phase is JobPhase.TRAINING


def test_status_event_structured_json() -> None:
    event = StatusEvent.for_job("job-1", 0, "failed", source=SOURCE, error="boom", time=T0, event_id="e-1")
    body = json.loads(event.to_json_bytes())
    assert body["specversion"] == "1.0"
    assert body["id"] == "e-1"
    assert body["type"] == "io.cdtrain.job.failed"
    assert body["subject"] == "job-1"
    assert body["time"] == "2025-03-01T12:00:00.123000Z"
    assert body["datacontenttype"] == "application/json"
    assert body["data"] == {"job_id": "job-1", "sequence": 0, "state": "failed", "error": "boom"}
    assert CLOUDEVENTS_CONTENT_TYPE == "application/cloudevents+json"


def test_status_event_round_trip() -> None:
    request = TrainRequest(dataset_uri="s3://datasets/levir.zip", config={"epochs": 2}, idempotency_key="k")
    job = TrainJob(job_id="job-7", request=request, submitted_at=T0)
    event = StatusEvent.queued(job, source=event_source("ingress", "api-0"))
    again = StatusEvent.from_json(event.to_json_bytes())
    assert again == event
    assert again.data.request == request
    assert again.data.submitted_at == T0
    assert again.data.source == "api"
    assert again.time == T0  # QUEUED happens when the job is submitted


def test_succeeded_event_carries_the_model_decision() -> None:
    reason = "first production version: F1 0.8300 on this job's validation split is above the quality gate 0.3700"
    event = StatusEvent.for_job("job-1", 9, "succeeded", source=SOURCE, model_version="1", model_alias="production",
                                model_decision=reason, time=T0)
    body = json.loads(event.to_json_bytes())
    assert body["data"]["model_decision"] == reason
    assert StatusEvent.from_json(event.to_json_bytes()).data.model_decision == reason
    # Events of an older worker have no decision; the field is optional.
    del body["data"]["model_decision"]
    assert StatusEvent.model_validate(body).data.model_decision is None


def test_status_event_rejects_mismatched_type_and_subject() -> None:
    good = StatusEvent.for_job("job-1", 1, JobState.STARTING, source=SOURCE)
    body = json.loads(good.to_json_bytes())
    with pytest.raises(ValidationError, match="does not match data.state"):
        StatusEvent.model_validate({**body, "type": "io.cdtrain.job.running"})
    with pytest.raises(ValidationError, match="does not match data.job_id"):
        StatusEvent.model_validate({**body, "subject": "job-2"})
    with pytest.raises(ValidationError) as info:
        StatusEvent.model_validate({**body, "specversion": "0.3"})
    assert _locs(info.value) == ["specversion"]


def test_status_event_ignores_extension_attributes() -> None:
    body = json.loads(StatusEvent.for_job("job-1", 1, "starting", source=SOURCE).to_json_bytes())
    body["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    body["data"]["added_later"] = True
    assert StatusEvent.model_validate(body).data.state is JobState.STARTING


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"job_id": "job-1", "sequence": -1, "state": "running"}, "data.sequence"),
        ({"job_id": "job-1", "sequence": 1, "state": "paused"}, "data.state"),
        ({"job_id": "job.1", "sequence": 1, "state": "running"}, "data.job_id"),
        ({"job_id": "job-1", "sequence": 1, "state": "running", "epochs": 0}, "data.epochs"),
        ({"job_id": "job-1", "sequence": 1, "state": "running", "phase": "resting"}, "data.phase"),
        ({"job_id": "job-1", "sequence": 1, "state": "running", "metrics": {"f1": "high"}}, "data.metrics.f1"),
    ],
)
def test_status_data_errors_name_the_field(data: dict, loc: str) -> None:
    with pytest.raises(ValidationError) as info:
        StatusEvent.model_validate({"source": SOURCE, "type": "io.cdtrain.job.running", "subject": "job-1", "data": data})
    assert loc in _locs(info.value)


def test_status_data_non_finite_metrics_become_null() -> None:
    event = StatusEvent.for_job("job-1", 4, "running", source=SOURCE, epoch=1,
                                metrics={"loss": float("nan"), "grad": float("inf"), "f1": 0.5})
    assert event.data.metrics == {"loss": None, "grad": None, "f1": 0.5}
    assert json.loads(event.to_json_bytes())["data"]["metrics"] == {"loss": None, "grad": None, "f1": 0.5}


def test_routing_key() -> None:
    assert status_routing_key("job-1", JobState.SUCCEEDED) == "job.job-1.succeeded"
    assert status_routing_key("job-1", "RUNNING") == "job.job-1.running"
    assert StatusEvent.for_job("job-1", 2, "cancelled", source=SOURCE).routing_key == "job.job-1.cancelled"
    with pytest.raises(ValueError, match="routing key"):
        status_routing_key("job.1", JobState.RUNNING)
    assert event_type("QUEUED") == "io.cdtrain.job.queued"


def test_status_data_defaults() -> None:
    data = StatusData(job_id="job-1", sequence=0, state="queued")
    assert (data.phase, data.epoch, data.metrics, data.error, data.request) == (None, None, None, None, None)


# --- job view ----------------------------------------------------------------------------------------


def test_job_view_round_trip() -> None:
    view = JobView(
        job_id="job-1",
        state="succeeded",
        request=TrainRequest(dataset_uri="s3://b1/x"),
        submitted_at=T0,
        updated_at=T0 + timedelta(minutes=5),
        last_sequence=9,
        source="api",
        epoch=2,
        epochs=2,
        metrics={"val_f1": 0.9},
        best_metrics={"val_f1": 0.9},
        model_name="snunet-cbam",
        model_version="3",
        model_alias="candidate",
        model_decision="below the quality gate: F1 0.1100 <= all-change F1 0.2700 + margin 0.10",
        history=[{"epoch": 1, "metrics": {"val_f1": 0.8}, "time": T0}, {"epoch": 2, "metrics": {"val_f1": 0.9}}],
    )
    assert JobView.model_validate_json(view.model_dump_json()) == view
    assert view.state is JobState.SUCCEEDED and view.state.is_terminal
    with pytest.raises(ValidationError) as info:
        JobView(job_id="j", state="running", submitted_at=T0, updated_at=T0, last_sequence=-1)
    assert _locs(info.value) == ["last_sequence"]
