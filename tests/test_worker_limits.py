"""A job past one of the worker's limits ends FAILED, and its error names the limit's variable.

The real parts: the TrainingWorker on both buses, the dataset in moto's S3, MLflow on SQLite."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from consumer.limits import DatasetLimits
from consumer.stores import StoreResolver
from consumer.tracking.job_tracker import MlflowJobTracker
from consumer.worker import TrainingWorker, WorkerSettings
from infra.bus import MessageBus
from infra.objects import S3ObjectStore
from schemas import JobState, StatusEvent, TrainJob, TrainRequest
from snunet_cbam.synthetic import make_synthetic_dataset

TINY = {"base_channel": 4, "crop_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu", "compile": False,
        "amp": False, "window_size": 64, "window_overlap": 8, "crops_per_image": 1, "epochs": 1}


async def upload_synthetic(store: S3ObjectStore, bucket: str, prefix: str, local: Path) -> int:
    make_synthetic_dataset(local, pairs=6, size=64, seed=3)
    files = [p for p in sorted(local.rglob("*")) if p.is_file()]
    await asyncio.gather(*(store.upload_file(bucket, prefix + p.relative_to(local).as_posix(), p) for p in files))
    return len(files)


async def run_job(bus: MessageBus, worker: TrainingWorker, job: TrainJob, timeout: float = 120.0) -> list[StatusEvent]:
    events: list[StatusEvent] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        events.append(event)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    await bus.publish_request(job)
    subscription = await bus.consume_requests(worker.handle, model=TrainJob, prefetch=1)
    try:
        for _ in range(int(timeout / 0.1)):
            if events and events[-1].data.state.is_terminal:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the job did not end within {timeout:.0f} s: {[e.data.state for e in events]}")
    finally:
        await subscription.close()
        await watcher.close()
    return events


@pytest.mark.parametrize("limit", ["objects", "pixels"])
async def test_a_job_over_a_worker_limit_ends_failed_naming_the_variable(
    bus: MessageBus, s3_store: S3ObjectStore, s3_bucket: str, tmp_path: Path, limit: str
) -> None:
    files = await upload_synthetic(s3_store, s3_bucket, "datasets/synth/", tmp_path / "synth")
    if limit == "objects":
        limits = DatasetLimits(max_dataset_objects=files - 1)
        expected = (f"dataset s3://{s3_bucket}/datasets/synth/ holds {files} objects, over the limit of {files - 1} "
                    "(CDTRAIN_MAX_DATASET_OBJECTS on the workers); split the dataset or raise the limit")
    else:
        # One pixel under the 64x64 tiles; skip_invalid must not turn the refusal into skipped pairs.
        limits = DatasetLimits(max_image_pixels=64 * 64 - 1)
        expected = "image A is 64x64 = 4,096 pixels, over the limit of 4,095 pixels (CDTRAIN_MAX_IMAGE_PIXELS)"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = MlflowJobTracker(client, "limit-tests", artifact_location=(tmp_path / "artifacts").as_uri())
    settings = WorkerSettings(work_dir=tmp_path / "work", heartbeat_interval=0.5, limits=limits)
    worker = TrainingWorker(bus, StoreResolver(s3_store), tracker, settings)
    job = TrainJob(request=TrainRequest(dataset_uri=f"s3://{s3_bucket}/datasets/synth/",
                                        config={**TINY, "skip_invalid": True}))

    events = await run_job(bus, worker, job)

    done = events[-1].data
    assert done.state == JobState.FAILED, done
    assert expected in done.error
    states = [e.data.state for e in events]
    assert JobState.SUCCEEDED not in states
    cache = settings.work_dir / "cache"
    assert list((cache / "tmp").iterdir()) == []
    if limit == "objects":
        # Refused from the listing: nothing downloaded, no MLflow run started.
        assert list((cache / "datasets").iterdir()) == []
        assert JobState.RUNNING not in states
    else:
        assert done.error.startswith("invalid dataset: the dataset has images over the limit of 4,095 pixels "
                                     "(CDTRAIN_MAX_IMAGE_PIXELS on the workers)")
        run = tracker.client.get_run(next(e.data.mlflow_run_id for e in events if e.data.mlflow_run_id))
        assert run.info.status == "FAILED"
        assert not list((settings.work_dir / "runs").rglob("*.pt"))  # refused before training
    assert worker.datasets.held == {}  # the job's hold on its dataset ended with it
