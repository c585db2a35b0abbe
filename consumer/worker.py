"""The GPU worker: one train request in, a trained (and maybe registered) model and status events out.

A job's life on the bus (docs/bus.md): the request delivery is acked ("claimed") as soon as the
worker's STARTING event is confirmed, so jobs can run for hours although RabbitMQ 3.10 closes
channels holding a delivery for 30 minutes. From then on the job is kept alive by heartbeats, and
the projector's watchdog re-queues it if they stop. Training runs in a thread, so the event loop
keeps serving the broker's heartbeats and the status publisher.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from consumer.dataset_fetch import DatasetFetchError, fetch_config, fetch_dataset
from consumer.status import JobStatusPublisher
from consumer.status_hooks import StatusHooks
from consumer.stores import StoreResolver
from infra.bus import Delivery, MessageBus, heartbeat
from schemas import ConfigError, JobPhase, JobState, TrainConfig, TrainJob
from schemas.jobs import ATTEMPT_HEADER
from snunet_cbam.config import parse_yaml_mapping
from snunet_cbam.data.check import InvalidDatasetError
from snunet_cbam.data.layouts import DatasetLayoutError
from snunet_cbam.hooks import TrainerHooks, TrainResult
from snunet_cbam.metrics import METRIC_NAMES
from snunet_cbam.trainer import Trainer

log = logging.getLogger(__name__)

class JobInputError(Exception):
    """The job cannot run as asked; the message tells the user what to change."""


class RegisteredModel(BaseModel):
    version: str
    alias: str


class JobTracker(Protocol):
    """Experiment tracking for one job (MLflow in production); blocking calls, run in threads."""

    def start_run(self, job: TrainJob, config: TrainConfig, attempt: int) -> str: ...

    def hooks(self, run_id: str) -> TrainerHooks: ...

    def finish(self, run_id: str, result: TrainResult, job: TrainJob) -> RegisteredModel | None:
        """Log the best model; register and stage it when the job asks for it."""

    def fail(self, run_id: str, reason: str) -> None: ...


class WorkerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    work_dir: Path
    source: str = "/cdtrain/worker"
    heartbeat_interval: float = Field(30.0, gt=0)
    # Applied over every job's config: what this machine decides (e.g. num_workers, device).
    config_overrides: dict[str, Any] = Field(default_factory=dict)


class TrainingWorker:
    def __init__(self, bus: MessageBus, stores: StoreResolver, tracker: JobTracker, settings: WorkerSettings) -> None:
        self.bus = bus
        self.stores = stores
        self.tracker = tracker
        self.settings = settings
        self._cancels: dict[str, threading.Event] = {}
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def handle(self, job: TrainJob, delivery: Delivery) -> None:
        attempt = int(delivery.headers.get(ATTEMPT_HEADER, 0)) + delivery.delivery_count
        status = JobStatusPublisher(self.bus, job, source=self.settings.source, attempt=attempt)
        self._idle.clear()
        try:
            await status.publish(JobState.STARTING, JobPhase.DOWNLOADING)
            await delivery.ack()
            async with heartbeat(status.heartbeat, self.settings.heartbeat_interval):
                await self._run(job, attempt, status)
        finally:
            await status.close()
            self._idle.set()

    async def stop(self, timeout: float = 120.0) -> None:
        """Stop running jobs at their next step and wait for them: they are re-queued, not lost."""
        self._stopping = True
        for cancel in self._cancels.values():
            cancel.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("a job did not stop within %.0f s; the watchdog will re-queue it", timeout)

    # --- one job ---------------------------------------------------------------------------------
    async def _run(self, job: TrainJob, attempt: int, status: JobStatusPublisher) -> None:
        try:
            data_dir, config = await self._prepare(job)
        except JobInputError as exc:
            await status.publish(JobState.FAILED, JobPhase.DOWNLOADING, error=str(exc))
            return

        run_id = await asyncio.to_thread(self.tracker.start_run, job, config, attempt)
        await status.publish(JobState.RUNNING, JobPhase.TRAINING, epochs=config.epochs, mlflow_run_id=run_id)
        cancel = self._cancels[job.job_id] = threading.Event()
        if self._stopping:  # stop() came while the dataset was downloading
            cancel.set()
        out_dir = self.settings.work_dir / "runs" / job.job_id / f"attempt-{attempt}"
        trainer = Trainer(config, data_dir, out_dir, hooks=[self.tracker.hooks(run_id), StatusHooks(status)],
                          cancel=cancel)
        try:
            result = await asyncio.to_thread(trainer.fit)
        except (InvalidDatasetError, DatasetLayoutError) as exc:
            await self._fail(status, run_id, JobPhase.TRAINING, f"invalid dataset: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - any training crash ends the job with its reason
            log.exception("job %s: training failed", job.job_id)
            await self._fail(status, run_id, JobPhase.TRAINING, f"training failed: {type(exc).__name__}: {exc}")
            return
        finally:
            self._cancels.pop(job.job_id, None)

        if result.status == "cancelled":
            await asyncio.to_thread(self.tracker.fail, run_id, "cancelled")
            if self._stopping:
                await self._requeue(job, attempt, status)
            else:
                await status.publish(JobState.CANCELLED, JobPhase.TRAINING, error="cancelled")
            return
        if not result.best:
            await self._fail(status, run_id, JobPhase.TRAINING,
                             f"no epoch completed ({result.status}); raise time_limit_minutes or check the data")
            return

        if job.request.register_model:
            await status.publish(JobState.RUNNING, JobPhase.REGISTERING)
        try:
            registered = await asyncio.to_thread(self.tracker.finish, run_id, result, job)
        except Exception as exc:  # noqa: BLE001
            log.exception("job %s: logging or registering the model failed", job.job_id)
            await self._fail(status, run_id, JobPhase.REGISTERING, f"model registration failed: {exc}")
            return
        await status.publish(
            JobState.SUCCEEDED, None, metrics=summary_metrics(result),
            model_version=registered.version if registered else None,
            model_alias=registered.alias if registered else None,
        )

    async def _prepare(self, job: TrainJob) -> tuple[Path, TrainConfig]:
        request = job.request
        try:
            base = TrainConfig()
            if request.config_uri:
                store, location = self.stores.resolve(request.config_uri, field="config_uri")
                text = await fetch_config(store, location)
                base = TrainConfig.from_mapping(parse_yaml_mapping(text, request.config_uri))
            config = TrainConfig.from_mapping(self.settings.config_overrides, request.train_config(base))
            store, location = self.stores.resolve(request.dataset_uri, field="dataset_uri")
            fetched = await fetch_dataset(store, location, self.settings.work_dir / "cache")
        except (ConfigError, DatasetFetchError, ValueError) as exc:
            raise JobInputError(str(exc)) from None
        return fetched.path, config

    async def _fail(self, status: JobStatusPublisher, run_id: str, phase: JobPhase, reason: str) -> None:
        await asyncio.to_thread(self.tracker.fail, run_id, reason)
        await status.publish(JobState.FAILED, phase, error=reason)

    async def _requeue(self, job: TrainJob, attempt: int, status: JobStatusPublisher) -> None:
        """Shutting down: the job goes back to the queue for another worker."""
        await self.bus.publish_request(job, message_id=job.job_id, headers={ATTEMPT_HEADER: attempt + 1})
        await status.publish(JobState.QUEUED, None, error="re-queued: the worker shut down")


def summary_metrics(result: TrainResult) -> dict[str, float]:
    metrics = {f"val_{k}": float(v) for k, v in result.best.items() if k != "epoch"}
    metrics["best_epoch"] = float(result.best["epoch"])
    if result.test:
        metrics.update({f"test_{k}": float(result.test[k]) for k in METRIC_NAMES})
    return metrics

