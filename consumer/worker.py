"""The GPU worker: one train request in, a trained (and maybe registered) model and status events out.

A job's life on the bus (docs/bus.md): the request delivery is acked ("claimed") as soon as the
worker's STARTING event is confirmed, so jobs can run for hours although RabbitMQ 3.10 closes
channels holding a delivery for 30 minutes. From then on the job is kept alive by heartbeats, and
the projector's watchdog re-queues it if they stop. Training runs in a thread, so the event loop
keeps serving the broker's heartbeats and the status publisher.

Stopping a job (consumer/cancellation.py): a user's cancel ends it CANCELLED, checked when the
job is claimed (a cancelled queued job never starts), while its dataset downloads, at every
training step and before registration; a worker shutdown (``stop``) re-queues it instead.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from consumer.cancellation import CancellationLookup, JobControl, lookup_reason, poll_cancellation
from consumer.dataset_fetch import DatasetFetchError, fetch_config, fetch_dataset
from consumer.status import JobStatusPublisher
from consumer.status_hooks import StatusHooks
from consumer.stores import StoreResolver
from infra.bus import Delivery, MessageBus, heartbeat
from schemas import ConfigError, JobPhase, JobState, TrainConfig, TrainJob
from schemas.control import CancelCommand
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
    # Why the version was (not) promoted to production, in words (the registry's reason).
    decision: str | None = None


class JobTracker(Protocol):
    """Experiment tracking for one job (MLflow in production); blocking calls, run in threads."""

    def start_run(self, job: TrainJob, config: TrainConfig, attempt: int) -> str: ...

    def hooks(self, run_id: str) -> TrainerHooks: ...

    def finish(self, run_id: str, result: TrainResult, job: TrainJob, data_dir: Path,
               config: TrainConfig) -> RegisteredModel | None:
        """Log the best model; register and stage it when the job asks for it, and promote it
        when it beats production on this job's data (``data_dir``, ``config.val_split``)."""

    def fail(self, run_id: str, reason: str) -> None: ...


class WorkerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    work_dir: Path
    source: str = "/cdtrain/worker"
    heartbeat_interval: float = Field(30.0, gt=0)
    # Applied over every job's config: what this machine decides (e.g. num_workers, device).
    config_overrides: dict[str, Any] = Field(default_factory=dict)


class _Cancelled(Exception):
    """A user's cancel arrived before training started (claim or dataset fetch)."""


class TrainingWorker:
    def __init__(self, bus: MessageBus, stores: StoreResolver, tracker: JobTracker, settings: WorkerSettings,
                 cancellations: CancellationLookup | None = None) -> None:
        self.bus = bus
        self.stores = stores
        self.tracker = tracker
        self.settings = settings
        # Read-only view of cancel requests (the job view store); None: bus commands only.
        self.cancellations = cancellations
        self._cancels: dict[str, JobControl] = {}
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def handle(self, job: TrainJob, delivery: Delivery) -> None:
        attempt = int(delivery.headers.get(ATTEMPT_HEADER, 0)) + delivery.delivery_count
        status = JobStatusPublisher(self.bus, job, source=self.settings.source, attempt=attempt)
        self._idle.clear()
        # Registered before the view is read: a cancel command from now on reaches this job
        # (the ordering argument is in consumer/cancellation.py).
        control = self._cancels[job.job_id] = JobControl()
        if self._stopping:
            control.stop()
        try:
            reason = await lookup_reason(self.cancellations, job.job_id)
            if reason is not None or control.cancel_requested:
                # Cancelled while queued: it never starts. CANCELLED first, then the ack, so a
                # crash in between redelivers it to a worker that skips it again.
                await status.publish(JobState.CANCELLED, None, error=reason or control.reason)
                await delivery.ack()
                log.info("job %s was cancelled before it started; skipped", job.job_id)
                return
            await status.publish(JobState.STARTING, JobPhase.DOWNLOADING)
            await delivery.ack()
            interval = self.settings.heartbeat_interval
            async with heartbeat(status.heartbeat, interval), \
                    poll_cancellation(self.cancellations, job.job_id, control, interval):
                await self._run(job, attempt, status, control)
        finally:
            self._cancels.pop(job.job_id, None)
            await status.close()
            self._idle.set()

    async def on_cancel(self, command: CancelCommand, _delivery: Delivery | None = None) -> None:
        """A cancel command from the control exchange: every worker gets it; the one running the
        job stops it (the others have nothing to do, and a queued job is caught at its claim)."""
        control = self._cancels.get(command.job_id)
        if control is not None:
            log.info("job %s: cancel requested at %s", command.job_id, command.requested_at.isoformat())
            control.cancel(command.reason)

    async def stop(self, timeout: float = 120.0) -> None:
        """Stop running jobs at their next step and wait for them: they are re-queued, not lost."""
        self._stopping = True
        for control in self._cancels.values():
            control.stop()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("a job did not stop within %.0f s; the watchdog will re-queue it", timeout)

    # --- one job ---------------------------------------------------------------------------------
    async def _run(self, job: TrainJob, attempt: int, status: JobStatusPublisher, control: JobControl) -> None:
        try:
            data_dir, config = await self._prepare_unless_cancelled(job, control)
        except JobInputError as exc:
            await status.publish(JobState.FAILED, JobPhase.DOWNLOADING, error=str(exc))
            return
        except _Cancelled:
            # No MLflow run exists yet; a partly fetched dataset stays in the cache's tmp/.
            await status.publish(JobState.CANCELLED, JobPhase.DOWNLOADING, error=control.reason)
            return

        run_id = await asyncio.to_thread(self.tracker.start_run, job, config, attempt)
        await status.publish(JobState.RUNNING, JobPhase.TRAINING, epochs=config.epochs, mlflow_run_id=run_id)
        # stop() during the download set the token already: the trainer stops at its first step.
        out_dir = self.settings.work_dir / "runs" / job.job_id / f"attempt-{attempt}"
        trainer = Trainer(config, data_dir, out_dir, hooks=[self.tracker.hooks(run_id), StatusHooks(status)],
                          cancel=control.token)
        try:
            result = await asyncio.to_thread(trainer.fit)
        except (InvalidDatasetError, DatasetLayoutError) as exc:
            await self._fail(status, run_id, JobPhase.TRAINING, f"invalid dataset: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - any training crash ends the job with its reason
            log.exception("job %s: training failed", job.job_id)
            await self._fail(status, run_id, JobPhase.TRAINING, f"training failed: {type(exc).__name__}: {exc}")
            return

        # A user's cancel wins over a shutdown (it must not come back), and one that arrived during
        # the final evaluation still stops the job before anything is registered. Checkpoints
        # (last.pt, best.pt) stay on disk either way.
        if control.cancel_requested:
            phase = JobPhase.TRAINING if result.status == "cancelled" else JobPhase.EVALUATING
            await asyncio.to_thread(self.tracker.fail, run_id, "cancelled")  # the run ends KILLED
            await status.publish(JobState.CANCELLED, phase, error=control.reason)
            return
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
            registered = await asyncio.to_thread(self.tracker.finish, run_id, result, job, data_dir, config)
        except Exception as exc:  # noqa: BLE001
            log.exception("job %s: logging or registering the model failed", job.job_id)
            await self._fail(status, run_id, JobPhase.REGISTERING, f"model registration failed: {exc}")
            return
        await status.publish(
            JobState.SUCCEEDED, None, metrics=summary_metrics(result),
            model_version=registered.version if registered else None,
            model_alias=registered.alias if registered else None,
            model_decision=registered.decision if registered else None,
        )

    async def _prepare_unless_cancelled(self, job: TrainJob, control: JobControl) -> tuple[Path, TrainConfig]:
        """The fetch, abandoned as soon as a user cancels (raises :class:`_Cancelled`).

        Cancelling the fetch is safe: datasets reach the cache by one atomic rename, and work in
        progress is swept from its tmp/ directory. A shutdown does not abandon it (as before).
        """
        if control.cancel_requested:
            raise _Cancelled
        fetch = asyncio.create_task(self._prepare(job), name=f"fetch-{job.job_id}")
        cancelled = asyncio.create_task(control.cancelled.wait())
        try:
            await asyncio.wait({fetch, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            if not fetch.done():
                fetch.cancel()
            await asyncio.gather(fetch, cancelled, return_exceptions=True)
        if control.cancel_requested:
            raise _Cancelled
        return fetch.result()

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
    if result.threshold is not None:
        metrics["threshold"] = float(result.threshold)
    if result.test:
        metrics.update({f"test_{k}": float(result.test[k]) for k in METRIC_NAMES})
    return metrics

