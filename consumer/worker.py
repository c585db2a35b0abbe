"""The GPU worker: one train request in, a trained (and maybe registered) model and status events out.

A job's life on the bus (docs/bus.md): the request delivery is acked ("claimed") as soon as the
worker's STARTING event is confirmed, so jobs can run for hours although RabbitMQ 3.10 closes
channels holding a delivery for 30 minutes. From then on the job is kept alive by heartbeats, and
the projector's watchdog re-queues it if they stop. Training runs in a thread, so the event loop
keeps serving the broker's heartbeats and the status publisher.

One owner per job (consumer/ownership.py): the worker claims the job by writing its STARTING
event to the job view with a conditional write before it publishes it; a finished job, or one a
later attempt holds, is acked and skipped. While training, the worker re-reads the view every
heartbeat and stops, registering nothing, once a later attempt holds the job.

Resume anywhere (consumer/checkpoints.py): every checkpoint goes to the checkpoint store, and an
attempt starts from the job's newest one, whichever worker wrote it.

Nothing lost in transit (consumer/outbox.py, consumer/status_relay.py): every status event is
written to the worker's outbox on local disk and sent from there, in order, until the broker
confirms it, however long that takes. Only the event before the ack (STARTING, or CANCELLED) is
awaited to the broker's confirm; the others, the job's end included, only to the disk, so a
broker outage never holds a handler for longer than ``status_settle_s``.

Stopping a job (consumer/cancellation.py): a user's cancel ends it CANCELLED, checked when the
job is claimed (a cancelled queued job never starts), while its dataset downloads, at every
training step and before registration; a worker shutdown (``stop``) checkpoints it and re-queues
it instead, except a job already registering, which finishes.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from consumer.cancellation import JobControl, cancel_reason
from consumer.checkpoints import CheckpointStore, CheckpointUploader, StoredProgress
from consumer.dataset_cache import DatasetCache
from consumer.dataset_fetch import DatasetFetchError, FetchedDataset, fetch_config, fetch_dataset
from consumer.limits import DatasetLimits
from consumer.metrics import WorkerMetrics
from consumer.outbox import StatusOutbox
from consumer.ownership import check_view, claim_job, read_view, watch_job
from consumer.status import JobStatusPublisher
from consumer.status_hooks import StatusHooks
from consumer.status_relay import StatusRelay
from infra.backoff import RetryBackoff, retry_briefly
from consumer.stores import StoreResolver
from infra.bus import Delivery, MessageBus, heartbeat
from infra.logs import log_context
from infra.views.store import JobViewStore
from schemas import ConfigError, JobPhase, JobState, TrainConfig, TrainJob
from schemas.control import CancelCommand
from schemas.jobs import ATTEMPT_HEADER
from snunet_cbam.config import parse_yaml_mapping
from snunet_cbam.data.check import InvalidDatasetError
from snunet_cbam.data.layouts import DatasetLayoutError
from snunet_cbam.hooks import TrainerHooks, TrainResult
from snunet_cbam.metrics import METRIC_NAMES
from snunet_cbam.trainer import BEST_CHECKPOINT, LAST_CHECKPOINT, Trainer

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

    def start_run(self, job: TrainJob, config: TrainConfig, attempt: int,
                  dataset: FetchedDataset | None = None) -> str:
        """The job's run (found again by a later attempt); ``dataset``, what was fetched for the
        job, is recorded as the run's input (its content key)."""

    def hooks(self, run_id: str) -> TrainerHooks: ...

    def finish(self, run_id: str, result: TrainResult, job: TrainJob, data_dir: Path,
               config: TrainConfig) -> RegisteredModel | None:
        """Log the best model; register and stage it when the job asks for it, and promote it
        when it beats production on this job's data (``data_dir``, ``config.val_split``)."""

    def fail(self, run_id: str, reason: str) -> None:
        """End the run FAILED with ``reason`` (KILLED for "cancelled"); a later attempt that
        resumes the job sets it running again."""

    def detach(self, run_id: str) -> None:
        """Stop logging to the run and leave its status alone: a newer attempt owns it now."""


class WorkerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    work_dir: Path
    source: str = "/cdtrain/worker"
    heartbeat_interval: float = Field(20.0, gt=0)
    # A checkpoint inside an epoch at least this often (the epoch's end always writes one): a
    # lost worker costs at most this much training.
    checkpoint_every_s: float | None = Field(600.0, gt=0)
    # Applied over every job's config: what this machine decides (e.g. num_workers, device).
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    # The status outbox (consumer/outbox.py): every status event waits there, on disk, until the
    # broker confirmed it. None: work_dir / "status-outbox.sqlite3". One per worker process.
    outbox_path: Path | None = None
    # Between attempts to publish while the broker is away; status events are retried forever.
    status_retry: RetryBackoff = RetryBackoff()
    # How long a finished job's handler, and the worker's exit, wait for the broker to confirm the
    # status events; what is not confirmed by then stays in the outbox (sent later, or by the next
    # process on the same outbox).
    status_settle_s: float = Field(10.0, ge=0)
    # What a job's dataset and config may take of this machine, and the dataset cache's bound.
    limits: DatasetLimits = DatasetLimits()

    @property
    def status_outbox(self) -> Path:
        return self.outbox_path or self.work_dir / "status-outbox.sqlite3"


class _Interrupted(Exception):
    """The job was stopped before training started (claim or dataset fetch)."""


class TrainingWorker:
    def __init__(self, bus: MessageBus, stores: StoreResolver, tracker: JobTracker, settings: WorkerSettings, *,
                 views: JobViewStore | None = None, checkpoints: CheckpointStore | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        self.bus = bus
        self.stores = stores
        self.tracker = tracker
        self.settings = settings
        # The job views: claims (one owner per job), cancel requests, superseded attempts. None:
        # no lease, and only bus commands stop a job (a bare worker in tests or embedding code).
        self.views = views
        # Where checkpoints go so that any worker resumes the job; None: this worker's disk only.
        self.checkpoints = checkpoints
        # Prometheus figures of jobs and epochs (consumer/metrics.py); None: none recorded.
        self.metrics = metrics
        # Every job's status events go through this outbox, in order, retried until confirmed.
        self.relay = StatusRelay(bus, StatusOutbox(settings.status_outbox), backoff=settings.status_retry)
        # Datasets by content, least recently used evicted past the bound; a job's own is held.
        self.datasets = DatasetCache(settings.work_dir / "cache", max_bytes=settings.limits.cache_max_bytes)
        self._controls: dict[str, JobControl] = {}
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def handle(self, job: TrainJob, delivery: Delivery) -> None:
        attempt = int(delivery.headers.get(ATTEMPT_HEADER, 0)) + delivery.delivery_count
        # Every log line of the job, the training thread's included, names it (infra/logs.py).
        with log_context(job_id=job.job_id, attempt=attempt):
            await self._handle(job, attempt, delivery)

    async def _handle(self, job: TrainJob, attempt: int, delivery: Delivery) -> None:
        status = JobStatusPublisher(self.relay, job, source=self.settings.source, attempt=attempt,
                                    settle_timeout=self.settings.status_settle_s)
        self._idle.clear()
        # Registered before the view is read: a cancel command from now on reaches this job
        # (the ordering argument is in consumer/cancellation.py).
        control = self._controls[job.job_id] = JobControl()
        if self._stopping:
            control.stop()
        try:
            reason = cancel_reason(await read_view(self.views, job.job_id)) or control.reason
            if reason is not None:
                # Cancelled while queued: it never starts. CANCELLED first, then the ack, so a
                # crash in between redelivers it to a worker that skips it again. Claimed like a
                # start: a job that ended already (FAILED at its deadline) is not re-ended.
                cancelled = status.make(JobState.CANCELLED, None, error=reason)
                if self.views is None or await claim_job(self.views, cancelled):
                    await status.send(cancelled)  # confirmed before the ack, as a STARTING
                await delivery.ack()
                log.info("job %s was cancelled before it started; skipped", job.job_id)
                return
            starting = status.make(JobState.STARTING, JobPhase.DOWNLOADING)
            if self.views is not None and not await claim_job(self.views, starting):
                # Ended, or held by this or a later attempt: not ours to run (rule 9).
                await delivery.ack()
                log.info("job %s: attempt %d not claimed: the job ended or another attempt holds it",
                         job.job_id, attempt)
                return
            # Confirmed by the broker before the ack: from the ack on, the status stream holds the job.
            await status.send(starting)
            await delivery.ack()
            if self.metrics is not None:
                self.metrics.job_started()
            interval = self.settings.heartbeat_interval
            try:
                async with heartbeat(status.heartbeat, interval), \
                        watch_job(self.views, job.job_id, attempt, control, interval):
                    await self._run(job, attempt, status, control)
            finally:
                if self.metrics is not None:
                    self.metrics.job_finished(status.state)
        finally:
            self._controls.pop(job.job_id, None)
            self.datasets.release(job.job_id)
            await status.close()
            self._idle.set()

    @property
    def idle(self) -> bool:
        """No job's handler is running."""
        return self._idle.is_set()

    def start(self) -> None:
        """Send the status events an earlier process left in the outbox (before any new one)."""
        self.relay.start()

    async def close(self) -> None:
        """After :meth:`stop`: give the outbox ``status_settle_s`` to empty, then let it go; the
        next worker on the same outbox sends what is left."""
        await self.relay.close(self.settings.status_settle_s)

    async def on_cancel(self, command: CancelCommand, _delivery: Delivery | None = None) -> None:
        """A cancel command from the control exchange: every worker gets it; the one running the
        job stops it (the others have nothing to do, and a queued job is caught at its claim)."""
        control = self._controls.get(command.job_id)
        if control is not None:
            log.info("job %s: cancel requested at %s", command.job_id, command.requested_at.isoformat())
            control.cancel(command.reason)

    async def stop(self, timeout: float = 120.0) -> None:
        """Stop running jobs at their next step (or abandon their fetch) and wait for them: they
        are checkpointed and re-queued, not lost. A job already registering finishes first."""
        self._stopping = True
        for control in self._controls.values():
            control.stop()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("a job did not stop within %.0f s; the watchdog will re-queue it", timeout)

    # --- one job ---------------------------------------------------------------------------------
    async def _run(self, job: TrainJob, attempt: int, status: JobStatusPublisher, control: JobControl) -> None:
        try:
            dataset, config = await self._prepare_unless_interrupted(job, control)
        except JobInputError as exc:
            await status.publish(JobState.FAILED, JobPhase.DOWNLOADING, error=str(exc))
            return
        except _Interrupted:
            # No MLflow run exists yet; a partly fetched dataset stays in the cache's tmp/.
            await self._end_interrupted(job, attempt, status, control, None, JobPhase.DOWNLOADING)
            return

        data_dir = dataset.path
        run_id = await asyncio.to_thread(self.tracker.start_run, job, config, attempt, dataset)
        await status.publish(JobState.RUNNING, JobPhase.TRAINING, epochs=config.epochs, mlflow_run_id=run_id)
        out_dir = self.settings.work_dir / "runs" / job.job_id / f"attempt-{attempt}"
        resumed = await self._restore(job, out_dir)
        hooks: list[TrainerHooks] = [self.tracker.hooks(run_id), StatusHooks(status)]
        if self.metrics is not None:
            hooks.append(self.metrics.hooks())
        if self.checkpoints is not None:
            hooks.append(CheckpointUploader(
                self.checkpoints, job.job_id, attempt, asyncio.get_running_loop(),
                best_key=resumed.best_key if resumed else None, enabled=lambda: not control.superseded))
        # stop() during the download set the token already: the trainer stops at its first step.
        trainer = Trainer(config, data_dir, out_dir, hooks=hooks, cancel=control.token,
                          checkpoint_every_s=self.settings.checkpoint_every_s,
                          max_image_pixels=self.settings.limits.max_image_pixels)
        try:
            result = await asyncio.to_thread(trainer.fit, resume=resumed is not None)
        except (InvalidDatasetError, DatasetLayoutError) as exc:
            await self._fail(status, run_id, JobPhase.TRAINING, f"invalid dataset: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - any training crash ends the job with its reason
            log.exception("job %s: training failed", job.job_id)
            await self._fail(status, run_id, JobPhase.TRAINING, f"training failed: {type(exc).__name__}: {exc}")
            return

        # A user's cancel wins over a shutdown (it must not come back), and one that arrived during
        # the final evaluation still stops the job before anything is registered. Checkpoints
        # stay (on disk and in the checkpoint store) either way.
        if result.status == "cancelled" or control.cancel_requested or control.superseded:
            phase = JobPhase.TRAINING if result.status == "cancelled" else JobPhase.EVALUATING
            await self._end_interrupted(job, attempt, status, control, run_id, phase)
            return
        if not result.best:
            await self._fail(status, run_id, JobPhase.TRAINING,
                             f"no epoch completed ({result.status}); raise time_limit_minutes or check the data")
            return
        # The last check before anything is registered: a newer attempt may hold the job now.
        check_view(await read_view(self.views, job.job_id), attempt, control)
        if control.cancel_requested or control.superseded:
            await self._end_interrupted(job, attempt, status, control, run_id, JobPhase.EVALUATING)
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

    async def _end_interrupted(self, job: TrainJob, attempt: int, status: JobStatusPublisher, control: JobControl,
                               run_id: str | None, phase: JobPhase) -> None:
        """A job stopped before its end: CANCELLED (a user's cancel), nothing more (superseded:
        the run belongs to the newer attempt now), or re-queued (shutdown). The MLflow run is
        KILLED in the first and last case: nothing trains it until an attempt resumes it."""
        if control.superseded and not control.cancel_requested:
            if run_id is not None:
                await asyncio.to_thread(self.tracker.detach, run_id)
            log.info("job %s: attempt %d stopped; a newer attempt holds the job", job.job_id, attempt)
            return
        if run_id is not None:
            await asyncio.to_thread(self.tracker.fail, run_id, "cancelled")
        if control.cancel_requested:
            await status.publish(JobState.CANCELLED, phase, error=control.reason)
        else:
            await self._requeue(job, attempt, status)

    async def _restore(self, job: TrainJob, out_dir: Path) -> StoredProgress | None:
        """The job's newest checkpoint, downloaded into ``out_dir``; None to start afresh. A store
        that cannot be read is retried, then the job starts afresh: training beats waiting."""
        if self.checkpoints is None:
            return None
        checkpoints = self.checkpoints

        async def newest() -> StoredProgress | None:
            progress = await checkpoints.latest(job.job_id)
            if progress is not None:
                await checkpoints.restore(progress, out_dir, LAST_CHECKPOINT, BEST_CHECKPOINT)
            return progress

        def retrying(exc: Exception, delay: float) -> None:
            log.warning("job %s: cannot read its checkpoints (%s); retrying in %ss", job.job_id, exc, delay)

        try:
            progress = await retry_briefly(newest, (1.0, 5.0), retrying)
        except Exception as exc:  # noqa: BLE001
            log.error("job %s: cannot read its checkpoints from %s (%s); training from the start",
                      job.job_id, checkpoints, exc)
            return None
        if progress is not None:
            log.info("job %s: resuming attempt %d's checkpoint (epoch %d, step %d%s)", job.job_id,
                     progress.attempt, progress.epoch, progress.global_step,
                     ", training finished" if progress.finished else "")
        return progress

    async def _prepare_unless_interrupted(self, job: TrainJob, control: JobControl) -> tuple[FetchedDataset, TrainConfig]:
        """The fetch, abandoned as soon as the job is cancelled, superseded or the worker stops
        (raises :class:`_Interrupted`).

        Abandoning the fetch is safe: datasets reach the cache by one atomic rename, and work in
        progress is swept from its tmp/ directory.
        """
        if control.token.is_set():
            raise _Interrupted
        fetch = asyncio.create_task(self._prepare(job), name=f"fetch-{job.job_id}")
        interrupted = asyncio.create_task(control.interrupted.wait())
        try:
            await asyncio.wait({fetch, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupted.cancel()
            if not fetch.done():
                fetch.cancel()
            await asyncio.gather(fetch, interrupted, return_exceptions=True)
        if control.token.is_set():
            raise _Interrupted
        return fetch.result()

    async def _prepare(self, job: TrainJob) -> tuple[FetchedDataset, TrainConfig]:
        request = job.request
        try:
            base = TrainConfig()
            if request.config_uri:
                store, location = self.stores.resolve(request.config_uri, field="config_uri")
                text = await fetch_config(store, location, max_bytes=self.settings.limits.max_config_bytes)
                # The file's text never reaches the job's public error: keys and problems only.
                base = TrainConfig.from_mapping(parse_yaml_mapping(text, request.config_uri, echo=False),
                                                echo_values=False)
            config = TrainConfig.from_mapping(self.settings.config_overrides, request.train_config(base))
            store, location = self.stores.resolve(request.dataset_uri, field="dataset_uri")
            fetched = await fetch_dataset(store, location, self.datasets, limits=self.settings.limits,
                                          holder=job.job_id)
        except (ConfigError, DatasetFetchError, ValueError) as exc:
            raise JobInputError(str(exc)) from None
        return fetched, config

    async def _fail(self, status: JobStatusPublisher, run_id: str, phase: JobPhase, reason: str) -> None:
        await asyncio.to_thread(self.tracker.fail, run_id, reason)
        await status.publish(JobState.FAILED, phase, error=reason)

    async def _requeue(self, job: TrainJob, attempt: int, status: JobStatusPublisher) -> None:
        """Shutting down: the job goes back to the queue for another worker, which resumes it
        from its checkpoint."""
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

