"""A job that asks for more GPUs than its worker has ends FAILED at its start, with both counts in
its error (docs/training.md, "Data parallel"): not a hang, not a silent fallback to fewer devices.

The real parts: the TrainingWorker on both buses, the dataset in moto's S3, MLflow on SQLite."""

from __future__ import annotations

from pathlib import Path

import torch
from mlflow import MlflowClient

from consumer.stores import StoreResolver
from consumer.tracking.job_tracker import MlflowJobTracker
from consumer.worker import TrainingWorker, WorkerSettings
from infra.bus import MessageBus
from infra.objects import S3ObjectStore
from schemas import JobState, TrainJob, TrainRequest

from .test_worker_limits import TINY, run_job, upload_synthetic


async def test_a_job_asking_for_more_gpus_than_the_worker_has_fails_at_start(
    bus: MessageBus, s3_store: S3ObjectStore, s3_bucket: str, tmp_path: Path
) -> None:
    await upload_synthetic(s3_store, s3_bucket, "datasets/synth/", tmp_path / "synth")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = MlflowJobTracker(client, "gpu-tests", artifact_location=(tmp_path / "artifacts").as_uri())
    settings = WorkerSettings(work_dir=tmp_path / "work", heartbeat_interval=0.5)
    worker = TrainingWorker(bus, StoreResolver(s3_store), tracker, settings)
    present = torch.cuda.device_count()
    gpus = max(2, present + 1)  # more than this machine has, whatever it has (gpus: 1 never asks)
    job = TrainJob(request=TrainRequest(dataset_uri=f"s3://{s3_bucket}/datasets/synth/",
                                        config={**TINY, "device": "auto", "gpus": gpus}))

    events = await run_job(bus, worker, job, timeout=60)

    done = events[-1].data
    assert done.state == JobState.FAILED, done
    assert f"gpus: {gpus} asks for {gpus} CUDA device(s) on this machine, but it has {present}" in done.error
    assert not list((settings.work_dir / "runs").rglob("*.pt"))  # refused before training
