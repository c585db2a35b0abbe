"""Log a training run to MLflow without ever stopping the training: the worker's runs
(``consumer/tracking``) and ``cdtrain train --mlflow`` go through this one module.

What a run holds: params, tags and metrics (per step, per epoch, at the end); per epoch a panel
of fixed validation tiles (``panels/epoch_NNN.png``); at the end the precision-recall curve and
the confusion matrix of the final model on validation and test (``curves/``, PNG and JSON),
``metrics.json`` and ``train_config.yaml``; optionally the best checkpoint
(``checkpoint/best.pt``); the dataset as the run's input (:func:`log_dataset_input`).

The trainer calls hooks from its own thread, one call at a time. Every MLflow call made here goes
through one background sender thread, so a slow or unreachable tracking server (MLflow's REST
client retries with back-off for minutes) never stalls a GPU step. Calls keep their order. Step
metrics are buffered and sent with ``log_batch`` every ``step_flush_every`` steps and at each
epoch end; while the server lags, step batches beyond ``max_step_backlog`` are dropped (and
counted) rather than queued without bound. Everything else (params, tags, epoch metrics, final
metrics and artifacts) is never dropped. ``on_run_end`` waits up to ``final_flush_timeout_s`` for
the queue to drain, so when ``Trainer.fit`` returns the run holds everything that could be logged.

A later attempt of a job logs into the run the earlier attempts used, and repeats what they
trained after their last checkpoint (all of it, when they died before the first). Before any metric is
sent, the sender reads what the run holds: step metrics up to its last logged step and epoch
metrics of the epochs it has are not logged again, and the epochs of the checkpoint's history
that it lacks (an attempt killed before its sender caught up) are logged as they would have been.

Failures are logged as warnings and counted in :attr:`MlflowHooks.health`; they never raise into
the trainer.
"""

from __future__ import annotations

import atexit
import collections
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (MAX_DATASET_DIGEST_SIZE, MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH,
                                     MAX_PARAMS_TAGS_PER_BATCH)

from .checkpoint import load_checkpoint, save_model_checkpoint
from .hooks import EpochInfo, RunStartInfo, StepInfo, TrainerHooks, TrainResult
from .model_source import CHECKPOINT_ARTIFACT, CHECKPOINT_DIR
from .hooks import RunStatus as TrainStatus
from .panels import ValidationPanel, png_bytes, render_confusion_matrix, render_panel, render_pr_curve

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "train_config.yaml"
METRICS_ARTIFACT = "metrics.json"
PANELS_DIR = "panels"  # panels/epoch_003.png: the validation panel of epoch 3
CURVES_DIR = "curves"  # curves/{val,test}_{pr_curve,confusion_matrix}.{png,json}
STEP_SERIES = "step_loss"  # logged at every reported step: its last step is where a run's steps stand
EPOCH_SERIES = "val_f1"  # logged once per epoch, in the one batch that carries all of the epoch's metrics
_MAX_KEPT_ERRORS = 20


def panel_artifact(epoch: int) -> str:
    """The run artifact of an epoch's validation panel."""
    return f"{PANELS_DIR}/epoch_{epoch:03d}.png"


def curve_artifacts(role: str) -> list[str]:
    """The run artifacts of a split's (``val``, ``test``) final curves: PNG and the numbers."""
    return [f"{CURVES_DIR}/{role}_{kind}.{ext}" for kind in ("pr_curve", "confusion_matrix") for ext in ("png", "json")]


def log_checkpoint(client: MlflowClient, run_id: str, checkpoint: Path | str | dict[str, Any]) -> str:
    """Upload the checkpoint's model (weights, config, threshold; no optimiser state) as
    ``checkpoint/best.pt`` of ``run_id``; returns that artifact path. ``checkpoint``: a path, or
    a checkpoint already loaded (no second read)."""
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location="cpu")
    with tempfile.TemporaryDirectory(prefix="cdtrain-ckpt-") as tmp:
        staged = Path(tmp) / CHECKPOINT_ARTIFACT.rsplit("/", 1)[1]
        save_model_checkpoint(state, staged)
        client.log_artifact(run_id, str(staged), CHECKPOINT_DIR)
    return CHECKPOINT_ARTIFACT


# --- dataset lineage --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetLineage:
    """What a run trained on: where the dataset came from and a digest of its content.

    ``key`` is the full content key: the worker's ETag key (a hash of the objects' keys and ETags,
    ``consumer.dataset_fetch.FetchedDataset.etag_key``) or, for a local directory, a hash of its
    files' names, sizes and modification times. MLflow keeps at most 36 characters of a dataset
    digest, so ``digest`` is the key's first 36; the whole key goes into the dataset's profile.
    """

    name: str
    source: str  # a URI: s3://bucket/prefix, file:///data/levir
    key: str
    files: int | None = None
    bytes: int | None = None

    @property
    def digest(self) -> str:
        return self.key[:MAX_DATASET_DIGEST_SIZE]

    @property
    def source_type(self) -> str:
        scheme = urlsplit(self.source).scheme
        return "local" if scheme in ("", "file") else scheme

    def as_entity(self) -> Dataset:
        profile = {"key": self.key, **({"files": self.files} if self.files is not None else {}),
                   **({"bytes": self.bytes} if self.bytes is not None else {})}
        return Dataset(name=self.name, digest=self.digest, source_type=self.source_type,
                       source=json.dumps({"uri": self.source}), profile=json.dumps(profile))


def local_dataset_lineage(root: Path | str) -> DatasetLineage:
    """The lineage of a dataset directory: its files' relative names, sizes and modification times
    hashed in name order (no file is read, so a large dataset costs a directory walk)."""
    root = Path(root).resolve()
    digest = hashlib.sha256()
    files = size = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        files += 1
        size += stat.st_size
    return DatasetLineage(name=root.name, source=root.as_uri(), key=digest.hexdigest(), files=files, bytes=size)


def log_dataset_input(client: MlflowClient, run_id: str, lineage: DatasetLineage, context: str = "training") -> None:
    """Record the dataset as the run's input (``mlflow.log_input`` with the client); logging the
    same dataset again (a later attempt of the job) adds nothing."""
    client.log_inputs(run_id, datasets=[DatasetInput(lineage.as_entity(),
                                                     tags=[InputTag("mlflow.data.context", context)])])


def _never_raises(method: Callable[..., None]) -> Callable[..., None]:
    """A hook that fails (a bug here, a full disk) records the error instead of stopping training."""

    @functools.wraps(method)
    def wrapper(self: "MlflowHooks", *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as exc:  # noqa: BLE001
            self._record_error(method.__name__, exc)

    return wrapper


def yaml_scalar(value: Any) -> str:
    """A config value as the YAML scalar that parses back to it (``None`` -> ``null``, ``True`` ->
    ``true``, ``"auto"`` -> ``auto``), so a run's params rebuild its config with ``yaml.safe_load``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The fully resolved training config as MLflow params (values are YAML scalars)."""
    params = {}
    for key, value in config.items():
        text = yaml_scalar(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:  # no such value in TrainConfig today; never fail on one
            text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
        params[key] = text
    return params


@dataclass
class TrackingHealth:
    """What went wrong while logging; the worker reports it with the job's status."""

    errors: int = 0  # MLflow calls that failed (each logged as a warning)
    dropped_step_metrics: int = 0  # step metric values dropped because the server lagged
    pending: int = 0  # calls still queued when the run ended (not logged)
    last_errors: list[str] = field(default_factory=list)  # the most recent few, oldest first

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.dropped_step_metrics == 0 and self.pending == 0


@dataclass(frozen=True)
class _LoggedBefore:
    """What earlier attempts logged into the run, never to be logged twice."""

    last_step: int = 0
    epochs: frozenset[int] = frozenset()


def _epoch_metrics(epoch: int, lr: float, seconds: float, train: Mapping[str, Any], val: Mapping[str, Any],
                   best_f1: float, now: int) -> list[Metric]:
    """An epoch's metrics at step = epoch: ``train_*``, ``val_*``, ``lr``, ``epoch_seconds``,
    ``best_val_f1_so_far``."""
    values: dict[str, float] = {}
    for prefix, metrics in (("train", train), ("val", val)):
        values.update({f"{prefix}_{k}": v for k, v in metrics.items() if _is_number(v)})
    values.update(lr=lr, epoch_seconds=seconds, best_val_f1_so_far=best_f1)
    return [Metric(k, float(v), now, epoch) for k, v in values.items()]


def _history_metrics(history: tuple[Mapping[str, Any], ...], now: int) -> list[Metric]:
    """The metrics ``on_epoch_end`` logged for each epoch of a checkpoint's history; the best F1
    so far is the running maximum of the validation F1, as the trainer keeps it."""
    metrics, best_f1 = [], -math.inf
    for record in history:
        best_f1 = max(best_f1, float(record["val"]["f1"]))
        metrics += _epoch_metrics(int(record["epoch"]), record["lr"], record["seconds"], record["train"],
                                  record["val"], best_f1, now)
    return metrics


class _Sender:
    """One daemon thread running submitted calls in order; failures go to ``on_error``."""

    def __init__(self, on_error: Callable[[str, BaseException], None], name: str) -> None:
        self._on_error = on_error
        self._items: collections.deque[tuple[str, Callable[[], None], int]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._droppable_pending = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, label: str, call: Callable[[], None], droppable_cost: int = 0,
               max_droppable: int | None = None) -> bool:
        """Queue ``call``; ``False`` when it was refused (closed, or a droppable call over budget)."""
        with self._cond:
            if self._closed:
                return False
            if droppable_cost and max_droppable is not None and self._droppable_pending >= max_droppable:
                return False
            self._items.append((label, call, droppable_cost))
            self._droppable_pending += bool(droppable_cost)
            self._cond.notify_all()
            return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._closed)
                if not self._items:
                    return
                label, call, droppable_cost = self._items.popleft()
                self._droppable_pending -= bool(droppable_cost)
                self._busy = True
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - nothing may escape the sender
                self._on_error(label, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def pending(self) -> int:
        with self._cond:
            return len(self._items) + int(self._busy)

    def close(self, timeout: float | None) -> int:
        """Drain for up to ``timeout`` seconds, then stop; returns the calls left unsent."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            left = len(self._items) + int(self._busy)
            self._items.clear()
            self._cond.notify_all()
        return left


class MlflowHooks(TrainerHooks):
    """Log one training run to an existing MLflow run.

    ``client`` carries the tracking URI (this class never reads it from the environment);
    ``run_id`` is the run the worker created for the job. Logged:

    * run start: the resolved config as params; tags ``device``, ``precision``, ``compiled``,
      ``parameters``, ``train_pairs``, ``val_pairs``, ``steps_per_epoch``, ``total_steps``,
      ``start_epoch``, ``start_step``; when resumed, the history's epochs the run lacks.
    * each step (step = global step, batched): ``step_loss``, ``step_f1``, ``step_lr``.
    * each epoch (step = epoch): ``train_*`` and ``val_*`` (loss, f1, iou, precision, recall,
      accuracy), ``lr``, ``epoch_seconds``, ``best_val_f1_so_far``.
    * run end: ``best_val_*`` and ``best_epoch`` (step = best epoch), ``test_*`` (step = best
      epoch: the test split is scored with the best checkpoint), tags ``train_status``,
      ``epochs_run``, ``best_epoch``; artifacts ``metrics.json`` and ``train_config.yaml``.
    * each epoch, artifact ``panels/epoch_NNN.png``: before | after | truth | prediction of the
      config's ``panel_tiles`` validation tiles, false positives and negatives coloured.
    * run end, artifacts ``curves/{val,test}_{pr_curve,confusion_matrix}.{png,json}`` (the final
      model; test when the run scored it) and, with ``log_best_checkpoint``, ``checkpoint/best.pt``.

    The run is not terminated here: the worker logs the model, registers it and then calls
    ``client.set_terminated`` (see :func:`consumer.tracking.mlflow_run_status`).
    """

    def __init__(self, client: MlflowClient, run_id: str, *, step_flush_every: int = 50,
                 step_metric_keys: tuple[str, ...] = ("f1",), max_step_backlog: int = 20,
                 final_flush_timeout_s: float = 300.0, log_best_checkpoint: bool = False) -> None:
        """``log_best_checkpoint``: upload the best checkpoint at the run's end (the worker does
        not: ``log_best_model`` uploads it with the model)."""
        if step_flush_every < 1:
            raise ValueError("step_flush_every must be >= 1")
        self.client = client
        self.run_id = run_id
        self.step_flush_every = step_flush_every
        self.step_metric_keys = step_metric_keys
        self.max_step_backlog = max_step_backlog
        self.final_flush_timeout_s = final_flush_timeout_s
        self.log_best_checkpoint = log_best_checkpoint
        self._health = TrackingHealth()
        self._errors: collections.deque[str] = collections.deque(maxlen=_MAX_KEPT_ERRORS)
        self._lock = threading.Lock()
        self._step_buffer: list[Metric] = []
        self._logged_before = _LoggedBefore()  # read and written by the sender thread only
        self._config: dict[str, Any] | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="cdtrain-mlflow-"))
        self._closed = False
        self._sender = _Sender(self._record_error, name=f"mlflow-sender-{run_id[:8]}")

    # --- what the worker reads ------------------------------------------------------------------
    @property
    def health(self) -> TrackingHealth:
        with self._lock:
            return TrackingHealth(
                errors=self._health.errors, dropped_step_metrics=self._health.dropped_step_metrics,
                pending=self._health.pending if self._closed else self._sender.pending(),
                last_errors=list(self._errors),
            )

    def flush(self, timeout: float | None = None) -> bool:
        """Send buffered step metrics and wait for the queue to drain; ``False`` on time-out."""
        self._flush_steps()
        return self._sender.flush(timeout)

    def close(self, timeout: float | None = None) -> TrackingHealth:
        """Drain (up to ``timeout``, default ``final_flush_timeout_s``) and stop the sender thread.

        Called by ``on_run_end``; call it yourself when ``fit`` raised. Safe to call twice.
        """
        if not self._closed:
            self._flush_steps()
            left = self._sender.close(self.final_flush_timeout_s if timeout is None else timeout)
            with self._lock:
                self._health.pending = left
                self._closed = True
            if left:
                log.warning("MLflow run %s: %d tracking call(s) not sent before the time-out", self.run_id, left)
            shutil.rmtree(self._tmp, ignore_errors=True)
        return self.health

    # --- hooks ----------------------------------------------------------------------------------
    @_never_raises
    def on_run_start(self, info: RunStartInfo) -> None:
        self._config = dict(info.config)
        params = [Param(k, v) for k, v in config_params(info.config).items()]
        tags = [RunTag(k, str(v)) for k, v in {
            "device": info.device, "precision": info.precision, "compiled": str(info.compiled).lower(),
            "parameters": info.parameters, "train_pairs": info.train_pairs, "val_pairs": info.val_pairs,
            "steps_per_epoch": info.steps_per_epoch, "total_steps": info.total_steps,
            "start_epoch": info.start_epoch, "start_step": info.start_step,
        }.items()]
        for i in range(0, max(len(params), len(tags)), MAX_PARAMS_TAGS_PER_BATCH):
            chunk_p, chunk_t = params[i : i + MAX_PARAMS_TAGS_PER_BATCH], tags[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            self._submit("log config params and run tags",
                         lambda p=chunk_p, t=chunk_t: self.client.log_batch(self.run_id, params=p, tags=t))
        # Also for a run that starts at step 0: an earlier attempt killed before its first
        # checkpoint logged steps that this one trains again.
        history = _history_metrics(info.history, _now_ms())
        self._submit("read what earlier attempts logged", lambda: self._catch_up(history))

    @_never_raises
    def on_step_end(self, info: StepInfo) -> None:
        now = _now_ms()
        step = info.global_step
        values = {"step_loss": info.loss, "step_lr": info.lr}
        for key in self.step_metric_keys:
            if key in info.metrics:
                values[f"step_{key}"] = info.metrics[key]
        self._step_buffer.extend([Metric(k, float(v), now, step) for k, v in values.items()])  # all or none
        if step % self.step_flush_every == 0:
            self._flush_steps()

    @_never_raises
    def on_epoch_end(self, info: EpochInfo) -> None:
        self._flush_steps()
        metrics = _epoch_metrics(info.epoch, info.lr, info.seconds, info.train, info.val, info.best_f1, _now_ms())
        self._submit(f"log epoch {info.epoch} metrics", lambda: self._log_metrics(self._new_epochs(metrics)))

    @_never_raises
    def on_validation_panel(self, panel: ValidationPanel) -> None:
        # Rendered by the sender, off the training thread. A resumed attempt that repeats an epoch
        # replays it exactly, so logging its panel again writes the same picture.
        self._submit(f"log the panel of epoch {panel.epoch}", lambda: self._log_panel(panel))

    @_never_raises
    def on_run_end(self, result: TrainResult) -> None:
        try:
            self._log_run_end(result)
        finally:
            self.close()

    def _log_run_end(self, result: TrainResult) -> None:
        self._flush_steps()
        now = _now_ms()
        best_epoch = int(result.best.get("epoch", 0)) if result.best else 0
        values: dict[str, float] = {}
        if result.best:
            values.update({f"best_val_{k}": v for k, v in result.best.items() if k != "epoch" and _is_number(v)})
            values["best_epoch"] = best_epoch
        if result.val_at_threshold:
            # The decision threshold tuned on validation, and the validation scores at it.
            values.update({f"tuned_val_{k}": v for k, v in result.val_at_threshold.items()
                           if k != "threshold" and _is_number(v)})
            values["threshold"] = result.threshold
        if result.test:
            values.update({f"test_{k}": v for k, v in result.test.items() if _is_number(v)})
        metrics = [Metric(k, float(v), now, best_epoch) for k, v in values.items()]
        tags = [RunTag("train_status", result.status), RunTag("epochs_run", str(result.epochs_run)),
                RunTag("best_epoch", str(best_epoch))]
        self._submit("log final metrics and tags", lambda: self._log_metrics(metrics, tags))

        # Snapshot the files now: the worker may clean the output directory once fit returns.
        files = []
        try:
            if result.metrics_path.is_file():
                shutil.copyfile(result.metrics_path, self._tmp / METRICS_ARTIFACT)
                files.append(self._tmp / METRICS_ARTIFACT)
            if self._config is not None:
                (self._tmp / CONFIG_ARTIFACT).write_text(yaml.safe_dump(self._config, sort_keys=False))
                files.append(self._tmp / CONFIG_ARTIFACT)
        except OSError as exc:
            self._record_error("write the run's artifacts", exc)
        for path in files:
            self._submit(f"log {path.name}", lambda p=path: self.client.log_artifact(self.run_id, str(p)))
        for role, documents in result.curves.items():
            self._submit(f"log the {role} curves", lambda r=role, d=documents: self._log_curves(r, d))
        if self.log_best_checkpoint and result.best and result.best_checkpoint.is_file():
            state = load_checkpoint(result.best_checkpoint, map_location="cpu")  # now: the file may go
            self._submit("log the best checkpoint", lambda: log_checkpoint(self.client, self.run_id, state))

    # --- internals ------------------------------------------------------------------------------
    def _log_panel(self, panel: ValidationPanel) -> None:
        title = f"epoch {panel.epoch}: validation at threshold {panel.threshold:.3f}"
        path = self._tmp / panel_artifact(panel.epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(render_panel(panel.tiles, title=title)))
        self.client.log_artifact(self.run_id, str(path), PANELS_DIR)
        path.unlink()

    def _log_curves(self, role: str, documents: Mapping[str, Any]) -> None:
        folder = self._tmp / CURVES_DIR / role
        folder.mkdir(parents=True, exist_ok=True)
        split = "validation" if role == "val" else role
        files = {}
        pr, confusion = documents.get("pr_curve"), documents.get("confusion")
        if pr is not None:
            files[f"{role}_pr_curve.json"] = json.dumps(pr).encode()
        if confusion is not None:
            files[f"{role}_confusion_matrix.json"] = json.dumps(confusion, indent=2).encode()
        try:
            if pr is not None:
                files[f"{role}_pr_curve.png"] = render_pr_curve(pr, title=f"precision-recall, {split}")
            if confusion is not None:
                files[f"{role}_confusion_matrix.png"] = render_confusion_matrix(
                    confusion, title=f"{split} at threshold {confusion['threshold']:.3f}")
        except ImportError:  # matplotlib comes with MLflow, not with mlflow-skinny: the numbers still go
            log.warning("MLflow run %s: matplotlib is missing; the %s curves are logged as JSON only",
                        self.run_id, role)
        for name, content in files.items():
            (folder / name).write_bytes(content)
        self.client.log_artifacts(self.run_id, str(folder), CURVES_DIR)
        shutil.rmtree(folder, ignore_errors=True)

    def _flush_steps(self) -> None:
        if not self._step_buffer:
            return
        batch, self._step_buffer = self._step_buffer, []
        accepted = self._sender.submit("log step metrics", lambda: self._log_metrics(self._new_steps(batch)),
                                       droppable_cost=len(batch), max_droppable=self.max_step_backlog)
        if not accepted:
            with self._lock:
                self._health.dropped_step_metrics += len(batch)
            if not self._closed:
                log.warning("MLflow run %s: tracking server lags; dropped %d step metric values",
                            self.run_id, len(batch))

    # In the sender thread: it runs calls in order, so the catch-up is done before the first
    # metric is filtered.
    def _catch_up(self, history: list[Metric]) -> None:
        """Read what the run holds, then log the history's epochs it lacks."""
        last_step = max((m.step for m in self.client.get_metric_history(self.run_id, STEP_SERIES)), default=0)
        epochs = frozenset(m.step for m in self.client.get_metric_history(self.run_id, EPOCH_SERIES))
        self._logged_before = _LoggedBefore(last_step, epochs | {m.step for m in history})
        self._log_metrics([m for m in history if m.step not in epochs])

    def _new_steps(self, metrics: list[Metric]) -> list[Metric]:
        return [m for m in metrics if m.step > self._logged_before.last_step]

    def _new_epochs(self, metrics: list[Metric]) -> list[Metric]:
        return [m for m in metrics if m.step not in self._logged_before.epochs]

    def _log_metrics(self, metrics: list[Metric], tags: list[RunTag] | None = None) -> None:
        tags = tags or []
        size = MAX_METRICS_PER_BATCH - MAX_PARAMS_TAGS_PER_BATCH  # room for the tags in one request
        for i in range(0, max(len(metrics), 1), size):
            chunk = metrics[i : i + size]
            if chunk or tags:
                self.client.log_batch(self.run_id, metrics=chunk, tags=tags)
            tags = []

    def _submit(self, label: str, call: Callable[[], None]) -> None:
        if not self._sender.submit(label, call):
            self._record_error(label, RuntimeError("the MLflow hooks are closed"))

    def _record_error(self, label: str, exc: BaseException) -> None:
        message = f"{label}: {type(exc).__name__}: {exc}"
        with self._lock:
            self._health.errors += 1
            self._errors.append(message[:2000])
        log.warning("MLflow run %s: %s (training continues)", self.run_id, message[:2000])


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- runs ---------------------------------------------------------------------------------------
def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it if missing (safe when two workers race to create it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def mlflow_run_status(status: TrainStatus | None) -> str:
    """The MLflow run status for a training outcome (``None``: training raised)."""
    return {"completed": "FINISHED", "early_stopped": "FINISHED", "time_limit": "FINISHED",
            "cancelled": "KILLED"}.get(status or "", "FAILED")


LOCAL_RUN_TAG = "cdtrain.out_dir"  # a local run's output directory: --resume logs into the same run
DEFAULT_LOCAL_EXPERIMENT = "cdtrain"


class LocalRunHooks(MlflowHooks):
    """``cdtrain train --mlflow URI``: the worker's run logging for a run on this machine, plus
    what the worker does around it: the run is created (found again with ``--resume``, by its
    output directory), the dataset directory is its input, the best checkpoint is uploaded, and
    the run is ended with the training's status (FAILED when the process leaves without one)."""

    @classmethod
    def start(cls, tracking_uri: str, data_dir: Path | str, out_dir: Path | str, *, resume: bool = False,
              experiment: str | None = None) -> "LocalRunHooks":
        client = MlflowClient(tracking_uri)
        experiment_id = ensure_experiment(client, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                                          or DEFAULT_LOCAL_EXPERIMENT)
        out = Path(out_dir).resolve()
        lineage = local_dataset_lineage(data_dir)
        run_id = None
        if resume:
            escaped = str(out).replace("\\", "\\\\").replace("'", "\\'")
            found = client.search_runs([experiment_id], filter_string=f"tags.`{LOCAL_RUN_TAG}` = '{escaped}'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
        if run_id is None:
            run_id = client.create_run(experiment_id, run_name=out.name, tags={
                LOCAL_RUN_TAG: str(out), "dataset_uri": lineage.source, "source": "cdtrain train"}).info.run_id
        log_dataset_input(client, run_id, lineage)
        hooks = cls(client, run_id, log_best_checkpoint=True)
        atexit.register(hooks.end, None)
        return hooks

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ended = False

    def on_run_end(self, result: TrainResult) -> None:
        super().on_run_end(result)  # logs the end of the run and drains the sender
        self.end(result.status)

    def end(self, status: TrainStatus | None) -> None:
        """Drain and end the run (``None``: training raised); once."""
        if self._ended:
            return
        self._ended = True
        atexit.unregister(self.end)
        self.close()
        try:
            self.client.set_terminated(self.run_id, mlflow_run_status(status))
        except Exception as exc:  # noqa: BLE001 - the training's result matters more than the run's status
            self._record_error("end the run", exc)
