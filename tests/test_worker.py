"""The worker on its own: a shutdown mid-training re-queues the job instead of losing it, and bad
input ends the job FAILED with a reason. Both buses; real MLflow on SQLite; real object store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from schemas.jobs import ATTEMPT_HEADER
from consumer.stores import StoreResolver
from consumer.tracking.job_tracker import MlflowJobTracker
from consumer.worker import TrainingWorker, WorkerSettings
from infra.bus import Delivery, MessageBus
from infra.objects import LocalObjectStore
from schemas import JobState, StatusEvent, TrainJob, TrainRequest
from snunet_cbam.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.slow

TINY = {"base_channel": 4, "crop_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu", "compile": False,
        "amp": False, "window_size": 64, "window_overlap": 8, "crops_per_image": 1}


@pytest.fixture
def worker_parts(tmp_path: Path) -> tuple[StoreResolver, MlflowJobTracker, WorkerSettings, Path]:
    objects = tmp_path / "objects"
    make_synthetic_dataset(objects / "lake" / "data", pairs=12, size=64, seed=5)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = MlflowJobTracker(client, "worker-tests", artifact_location=(tmp_path / "artifacts").as_uri())
    settings = WorkerSettings(work_dir=tmp_path / "work", heartbeat_interval=0.5)
    return StoreResolver(LocalObjectStore(objects)), tracker, settings, tmp_path


async def _wait(predicate, timeout: float = 120.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


async def test_shutdown_mid_training_requeues_the_job(bus: MessageBus, worker_parts) -> None:
    stores, tracker, settings, _ = worker_parts
    worker = TrainingWorker(bus, stores, tracker, settings)
    events: list[StatusEvent] = []
    requeued: list[tuple[TrainJob, dict[str, Any]]] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        events.append(event)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/data/", config={**TINY, "epochs": 200}))
    await bus.publish_request(job)
    subscription = await bus.consume_requests(worker.handle, model=TrainJob, prefetch=1)
    try:
        await _wait(lambda: any(e.data.epoch == 1 and e.data.metrics for e in events))
        await worker.stop()  # as the worker role does on SIGTERM: stop the job, then the consumer
        await subscription.close()

        async def take(requeued_job: TrainJob, delivery: Delivery) -> None:
            requeued.append((requeued_job, dict(delivery.headers)))

        taker = await bus.consume_requests(take, model=TrainJob, prefetch=1)
        await _wait(lambda: bool(requeued))
        await taker.close()
    finally:
        await watcher.close()

    again, headers = requeued[0]
    assert again.job_id == job.job_id and again.request == job.request
    assert int(headers[ATTEMPT_HEADER]) == 1
    states = [e.data.state for e in events]
    assert states[:2] == [JobState.STARTING, JobState.RUNNING] and states[-1] == JobState.QUEUED
    assert "re-queued" in events[-1].data.error
    assert [e.data.sequence for e in events] == sorted(e.data.sequence for e in events)
    run = tracker.client.get_run(events[-1].data.mlflow_run_id)
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("request_fields, reason", [
    ({"dataset_uri": "s3://lake/missing/"}, "no objects under s3://lake/missing/"),
    ({"dataset_uri": "s3://lake/data/", "config_uri": "s3://lake/none.yaml"}, "none.yaml"),
    ({"dataset_uri": "/srv/datasets/levir/"}, "local paths are not allowed on this worker"),
])
async def test_bad_input_ends_the_job_failed_with_its_reason(bus: MessageBus, worker_parts,
                                                             request_fields: dict, reason: str) -> None:
    stores, tracker, settings, _ = worker_parts
    worker = TrainingWorker(bus, stores, tracker, settings)
    events: list[StatusEvent] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        events.append(event)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    await bus.publish_request(TrainJob(request=TrainRequest(**request_fields, config={**TINY, "epochs": 1})))
    subscription = await bus.consume_requests(worker.handle, model=TrainJob, prefetch=1)
    try:
        await _wait(lambda: bool(events) and events[-1].data.state.is_terminal, timeout=30)
    finally:
        await subscription.close()
        await watcher.close()
    assert events[-1].data.state == JobState.FAILED
    assert reason in events[-1].data.error


async def test_a_registered_job_reports_where_its_model_went_and_why(bus: MessageBus, worker_parts) -> None:
    stores, tracker, settings, _ = worker_parts
    # A gate no model can pass (all-change F1 + 1): the outcome does not depend on the training.
    strict = MlflowJobTracker(tracker.client, "worker-tests", artifact_location=tracker.artifact_location,
                              promotion_margin=1.0)
    worker = TrainingWorker(bus, stores, strict, settings)
    events: list[StatusEvent] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        events.append(event)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/data/", register_model=True, model_name="cd-worker",
                                        config={**TINY, "epochs": 1, "test_split": None}))
    await bus.publish_request(job)
    subscription = await bus.consume_requests(worker.handle, model=TrainJob, prefetch=1)
    try:
        await _wait(lambda: bool(events) and events[-1].data.state.is_terminal, timeout=240)
    finally:
        await subscription.close()
        await watcher.close()

    done = events[-1].data
    assert done.state == JobState.SUCCEEDED, done.error
    assert (done.model_version, done.model_alias) == ("1", "staging")
    assert done.model_decision.startswith("below the quality gate: F1 ") and "+ margin 1.00" in done.model_decision
    tags = tracker.client.get_model_version("cd-worker", "1").tags
    assert tags["promotion"] == "kept" and tags["promotion_reason"] == done.model_decision
    assert tags["job_id"] == job.job_id
