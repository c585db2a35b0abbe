"""Settings of ``cdtrain serve``, read from the environment in this one place.

Unset service URLs mean the embedded parts, so ``cdtrain serve`` with no settings runs the whole
service on one machine: an in-process bus, a local-directory object store and a JSON-file view
store under ``CDTRAIN_DATA_DIR``, and MLflow on a SQLite file there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from infra.secret_files import with_secret_files
from schemas.redact import url_password
from consumer.limits import DatasetLimits
from infra.views.projector import DEFAULT_PROJECTOR_PREFETCH
from ingress.settings import IngressSettings
from schemas.jobs import DEFAULT_DEADLINE_S

# Longer than a request's trip from the queue to a worker that is already up, short next to a
# GPU's cost: a worker with a job limit that finds nothing to take exits after this.
DEFAULT_ONE_JOB_IDLE_EXIT_S = 120.0

# Variables read here, beyond those of IngressSettings (ingress/settings.py, ENV_VARS).
SERVICE_ENV_VARS = {
    "CDTRAIN_DATA_DIR": "worker cache, runs and the embedded stores (default .cdtrain)",
    "MLFLOW_TRACKING_URI": "MLflow tracking server or store (default sqlite:///<data dir>/mlflow.db)",
    "CDTRAIN_MLFLOW_EXPERIMENT": "MLflow experiment of the job runs (default cdtrain)",
    "CDTRAIN_HEARTBEAT_S": "seconds between a running job's heartbeats, and between its worker's reads of the "
                           "job view for a cancel request or a newer attempt (default 20)",
    "CDTRAIN_STALE_AFTER_S": "silence after which the watchdog re-queues a job (default 120: six heartbeats)",
    "CDTRAIN_WATCHDOG_INTERVAL_S": "seconds between the watchdog's sweeps (default 30)",
    "CDTRAIN_ACCEPT_GRACE_S": "seconds a queued job may wait for its request's confirm to be recorded before the "
                              "watchdog publishes the request again (default 60)",
    "CDTRAIN_CHECKPOINT_URI": "where workers keep job checkpoints, one folder per job: s3://bucket/prefix/ (shared "
                              "by all workers: a job resumes anywhere) or a local directory (default "
                              "<data dir>/checkpoints)",
    "CDTRAIN_CHECKPOINT_EVERY_S": "a checkpoint inside an epoch at least this often, besides every epoch's end "
                                  "(default 600)",
    "CDTRAIN_STEP_STALL_S": "time without a new training step after which the watchdog re-queues a job in phase "
                            "training though its worker still beats (a hung training thread; default 1800; must "
                            "exceed the longest validation pass and first-step compile)",
    "CDTRAIN_JOB_DEADLINE_S": "seconds from submission after which the watchdog ends a job FAILED and stops its "
                              "worker, unless the train request sets deadline_s (default 604800, 7 days)",
    "CDTRAIN_WORKER_CONFIG": "YAML mapping applied over every job's config on this worker, e.g. '{num_workers: 8}'",
    "CDTRAIN_WORKER_MAX_JOBS": "consumer role: take this many train requests, then exit 0 once the last has ended "
                               "(1: one Kubernetes Job per request; `cdtrain serve --max-jobs`; default: no limit)",
    "CDTRAIN_WORKER_IDLE_EXIT_S": "consumer role: exit 0 after this many seconds without a job in hand "
                                  "(`cdtrain serve --idle-exit`; default 120 with a job limit, else never)",
    "CDTRAIN_ALLOW_LOCAL_PATHS": "let jobs read file:// datasets (default: only in the embedded mode)",
    "CDTRAIN_METRICS_PORT": "consumer and projector roles: port of the Prometheus /metrics server, one per process, "
                            "on CDTRAIN_HOST (default 9100; 0: none). The ingress serves /metrics on its own port",
    "CDTRAIN_PROMOTION_MARGIN": "quality gate of the registry: a model reaches production only with an F1 above "
                                "its validation split's all-change F1 plus this margin (default 0.10)",
    # The worker's limits (consumer/limits.py); past one a job ends FAILED naming the variable.
    "CDTRAIN_MAX_ARCHIVE_BYTES": "largest dataset archive a worker downloads, checked on its HEAD and on what "
                                 "arrives (default 274877906944, 256 GiB)",
    "CDTRAIN_MAX_EXTRACTED_BYTES": "most bytes an archive may expand to (default 274877906944, 256 GiB)",
    "CDTRAIN_MAX_ARCHIVE_MEMBERS": "most members (files, folders, links) in an archive (default 1000000)",
    "CDTRAIN_MAX_DATASET_BYTES": "most bytes under a dataset prefix, from its listing (default 274877906944, 256 GiB)",
    "CDTRAIN_MAX_DATASET_OBJECTS": "most objects under a dataset prefix, from its listing (default 1000000)",
    "CDTRAIN_MAX_CONFIG_BYTES": "largest config_uri file (default 1048576, 1 MiB)",
    "CDTRAIN_MAX_IMAGE_PIXELS": "most pixels (width x height) in one image, read from its header before anything "
                                "decodes it; over it the dataset is refused whole (default 134217728, 2**27)",
    "CDTRAIN_CACHE_MAX_BYTES": "bound of a worker's dataset cache, least recently used datasets evicted first; the "
                               "one in use is kept even when larger (default 107374182400, 100 GiB)",
}


class ServiceSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    ingress: IngressSettings
    data_dir: Path = Path(".cdtrain")
    mlflow_tracking_uri: str
    mlflow_experiment: str = "cdtrain"
    # A lost worker costs minutes: it is found after stale_after (+ one sweep), and its job
    # resumes from a checkpoint at most checkpoint_every_s (or one epoch) old.
    heartbeat_interval: float = Field(20.0, gt=0)
    stale_after: float = Field(120.0, gt=0)
    watchdog_interval: float = Field(30.0, gt=0)
    # Well above the ingress's publish time-out: only a submitter that died leaves a job this long.
    accept_grace: float = Field(60.0, gt=0)
    # s3://bucket/prefix/ or a local directory; None: <data_dir>/checkpoints (see checkpoints_at).
    checkpoint_uri: str | None = None
    checkpoint_every_s: float = Field(600.0, gt=0)
    step_stall: float = Field(1800.0, gt=0)
    # 7 days: far above a GPU run of the shipped recipe (hours) plus a long wait in the queue,
    # short enough that a job nobody watches does not hold a GPU or a queue slot for weeks.
    job_deadline: float = Field(float(DEFAULT_DEADLINE_S), gt=0)
    worker_config: dict[str, Any] = Field(default_factory=dict)
    # A worker that exits after its jobs (one Kubernetes Job per request), and after idling:
    # None is no limit (see worker_idle_exit).
    worker_max_jobs: int | None = Field(None, ge=1)
    worker_idle_exit_s: float | None = Field(None, gt=0)
    allow_local_paths: bool = False
    # The worker's and projector's Prometheus endpoint (infra/metrics.py); 0: none.
    metrics_port: int = Field(9100, ge=0, le=65535)
    # The worker's quality gate (consumer/tracking/promotion.py): absolute F1 above the all-change
    # F1 of the job's validation split. Negative values lower the gate below "change everywhere".
    promotion_margin: float = Field(0.10, ge=-1, le=1)
    # Bus connection attempts (2 s apart) of the worker and projector roles before they exit.
    connect_attempts: int = Field(30, ge=1)
    # Status events the projector writes at once (one job's stay in order).
    projector_prefetch: int = Field(DEFAULT_PROJECTOR_PREFETCH, ge=1, le=1000)
    # What a job's dataset and config may take of a worker, and its dataset cache's bound.
    limits: DatasetLimits = DatasetLimits()

    def secret_values(self) -> list[str | None]:
        return [*self.ingress.secret_values(), url_password(self.mlflow_tracking_uri)]

    @property
    def checkpoints_at(self) -> str:
        return self.checkpoint_uri or str(self.data_dir / "checkpoints")

    @property
    def worker_idle_exit(self) -> float | None:
        """A worker with a job limit was started for a request that another worker may have taken
        first: without this it would hold its GPU, waiting, for ever."""
        if self.worker_idle_exit_s is None and self.worker_max_jobs is not None:
            return DEFAULT_ONE_JOB_IDLE_EXIT_S
        return self.worker_idle_exit_s

    @property
    def embedded_bus(self) -> bool:
        return self.ingress.bus.in_process

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "ServiceSettings":
        environ = with_secret_files(environ)
        env = {k: v for k, v in environ.items() if v != ""}
        data_dir = Path(env.get("CDTRAIN_DATA_DIR", ".cdtrain")).resolve()
        ingress = IngressSettings.from_env(environ)  # unfiltered: an empty token is an error there
        embedded = {}
        if "CDTRAIN_MONGODB_URL" not in env:
            embedded["view_store_url"] = str(data_dir / "views.json")
        s3_configured = "CDTRAIN_S3_ENDPOINT_URL" in env or "AWS_ACCESS_KEY_ID" in env
        if not s3_configured and ingress.local_objects_dir is None:
            embedded["local_objects_dir"] = data_dir / "objects"
        if embedded:
            ingress = ingress.model_copy(update=embedded)
        try:
            worker_config = yaml.safe_load(env.get("CDTRAIN_WORKER_CONFIG", "")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"CDTRAIN_WORKER_CONFIG is not valid YAML: {exc}") from None
        if not isinstance(worker_config, dict):
            raise ValueError("CDTRAIN_WORKER_CONFIG must be a YAML mapping, e.g. '{num_workers: 8}'")
        allow_local = env.get("CDTRAIN_ALLOW_LOCAL_PATHS")
        return cls(
            ingress=ingress,
            data_dir=data_dir,
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI", f"sqlite:///{data_dir / 'mlflow.db'}"),
            mlflow_experiment=env.get("CDTRAIN_MLFLOW_EXPERIMENT", "cdtrain"),
            heartbeat_interval=env.get("CDTRAIN_HEARTBEAT_S", 20.0),
            stale_after=env.get("CDTRAIN_STALE_AFTER_S", 120.0),
            watchdog_interval=env.get("CDTRAIN_WATCHDOG_INTERVAL_S", 30.0),
            accept_grace=env.get("CDTRAIN_ACCEPT_GRACE_S", 60.0),
            checkpoint_uri=env.get("CDTRAIN_CHECKPOINT_URI"),
            checkpoint_every_s=env.get("CDTRAIN_CHECKPOINT_EVERY_S", 600.0),
            step_stall=env.get("CDTRAIN_STEP_STALL_S", 1800.0),
            job_deadline=env.get("CDTRAIN_JOB_DEADLINE_S", float(DEFAULT_DEADLINE_S)),
            worker_config=worker_config,
            worker_max_jobs=env.get("CDTRAIN_WORKER_MAX_JOBS"),
            worker_idle_exit_s=env.get("CDTRAIN_WORKER_IDLE_EXIT_S"),
            promotion_margin=env.get("CDTRAIN_PROMOTION_MARGIN", 0.10),
            metrics_port=env.get("CDTRAIN_METRICS_PORT", 9100),
            limits=DatasetLimits.from_env(env),
            projector_prefetch=env.get("CDTRAIN_PROJECTOR_PREFETCH", DEFAULT_PROJECTOR_PREFETCH),
            allow_local_paths=(allow_local.lower() in ("1", "true", "yes", "on")) if allow_local
            else ingress.bus.in_process,
        )
