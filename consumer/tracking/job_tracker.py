"""The worker's view of MLflow: one run per job, the best model logged, registered on request."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

from mlflow import MlflowClient

from consumer.dataset_fetch import FetchedDataset
from consumer.worker import RegisteredModel
from schemas import TrainConfig, TrainJob
from schemas.redact import redact_credentials
from snunet_cbam.hooks import TrainResult
from snunet_cbam.mlflow_run import DatasetLineage, log_dataset_input

from snunet_cbam.mlflow_run import MlflowHooks
from .model import DIGEST_TAG, checkpoint_digest, log_best_model
from .promotion import DEFAULT_PROMOTION_MARGIN, PromotionJudge, validation_scorer
from .registry import MODEL_ID_TAG, find_logged_model, job_version, register_and_promote
from .runs import FAILURE_TAG, ensure_experiment, mlflow_run_status, start_job_run

log = logging.getLogger(__name__)



def fetched_lineage(dataset_uri: str, fetched: FetchedDataset) -> DatasetLineage:
    """A fetched dataset's lineage: its URI (credentials masked) and its ETag key."""
    source = redact_credentials(dataset_uri)
    name = source.rstrip("/").rsplit("/", 1)[-1] or source
    return DatasetLineage(name=name, source=source, key=fetched.etag_key, files=fetched.files, bytes=fetched.bytes)


class MlflowJobTracker:
    """Implements ``consumer.worker.JobTracker``; every method blocks and runs in a worker thread."""

    def __init__(self, client: MlflowClient, experiment: str = "cdtrain", artifact_location: str | None = None,
                 *, promotion_margin: float = DEFAULT_PROMOTION_MARGIN) -> None:
        self.client = client
        self.experiment = experiment
        self.artifact_location = artifact_location
        # Quality gate: a model is promoted only above its split's all-change F1 + this margin.
        self.promotion_margin = promotion_margin
        self._hooks: dict[str, MlflowHooks] = {}
        self._lock = threading.Lock()

    def ensure_experiment(self) -> str:
        return ensure_experiment(self.client, self.experiment, self.artifact_location)

    def start_run(self, job: TrainJob, config: TrainConfig, attempt: int,
                  dataset: FetchedDataset | None = None) -> str:
        """The job's run; ``dataset`` (what was fetched) becomes its input, digest = its ETag key:
        a later attempt on the same content adds nothing, one on changed content adds the new one."""
        self.ensure_experiment()
        run_id, _ = start_job_run(self.client, self.experiment, job_id=job.job_id,
                                  dataset_uri=job.request.dataset_uri, source=job.source,
                                  tags={"attempt": str(attempt), "model_name": job.request.model_name})
        if dataset is not None:
            log_dataset_input(self.client, run_id, fetched_lineage(job.request.dataset_uri, dataset))
        return run_id

    def hooks(self, run_id: str) -> MlflowHooks:
        hooks = MlflowHooks(self.client, run_id)
        with self._lock:
            self._hooks[run_id] = hooks
        return hooks

    def _close_hooks(self, run_id: str) -> None:
        with self._lock:
            hooks = self._hooks.pop(run_id, None)
        if hooks is not None:
            health = hooks.close()
            if not health.ok:
                log.warning("run %s: %d MLflow call(s) failed, %d step metric(s) dropped",
                            run_id, health.errors, health.dropped_step_metrics)

    def finish(self, run_id: str, result: TrainResult, job: TrainJob, data_dir: Path,
               config: TrainConfig) -> RegisteredModel | None:
        self._close_hooks(run_id)
        model_id = self._best_model_id(run_id, result, job)
        registered = None
        if job.request.register_model:
            registered = self._register(run_id, result, job, data_dir, config, model_id)
        self.client.set_terminated(run_id, mlflow_run_status(result.status))
        return registered

    def _best_model_id(self, run_id: str, result: TrainResult, job: TrainJob) -> str:
        """The logged model of the job's best checkpoint: logged now, unless an earlier attempt of
        the job left one to reuse (the export costs 12-20 s)."""
        reused = self._logged_by_earlier_attempt(run_id, result, job)
        if reused is not None:
            log.info("run %s: reusing logged model %s from an earlier attempt", run_id, reused)
            return reused
        return log_best_model(self.client, run_id, result.best_checkpoint).model_id

    def _logged_by_earlier_attempt(self, run_id: str, result: TrainResult, job: TrainJob) -> str | None:
        if job.request.register_model:
            # A job registers one version (registry.py): once there is one, its model is the job's.
            version = job_version(self.client, job.request.model_name, run_id)
            if version is not None and version.tags.get(MODEL_ID_TAG):
                return version.tags[MODEL_ID_TAG]
        try:
            return find_logged_model(self.client, run_id,
                                     tags={DIGEST_TAG: checkpoint_digest(result.best_checkpoint)})
        except LookupError:
            return None

    def _register(self, run_id: str, result: TrainResult, job: TrainJob, data_dir: Path, config: TrainConfig,
                  model_id: str) -> RegisteredModel:
        """Register, and promote only past the quality gate and over a champion scored on this
        job's validation split (consumer/tracking/promotion.py)."""
        with tempfile.TemporaryDirectory(prefix="cdtrain-champion-") as champions:
            judge = PromotionJudge(self.client, result.best_checkpoint, validation_scorer(data_dir, config),
                                   margin=self.promotion_margin, work_dir=Path(champions))
            outcome = register_and_promote(self.client, run_id, job.request.model_name, result.best["f1"],
                                           judge=judge, model_id=model_id, tags={"job_id": job.job_id})
        return RegisteredModel(version=str(outcome.version), alias=outcome.alias, decision=outcome.reason)

    def detach(self, run_id: str) -> None:
        self._close_hooks(run_id)

    def fail(self, run_id: str, reason: str) -> None:
        self._close_hooks(run_id)
        try:
            self.client.set_tag(run_id, FAILURE_TAG, redact_credentials(reason)[:4000])
            self.client.set_terminated(run_id, "KILLED" if reason == "cancelled" else "FAILED")
        except Exception:  # noqa: BLE001 - the job's FAILED event matters more than the run's tag
            log.exception("run %s: could not record the failure in MLflow", run_id)
