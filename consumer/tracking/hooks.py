"""Trainer hooks that log a run to MLflow without ever stopping the training.

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

import collections
import functools
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from snunet_cbam.hooks import EpochInfo, RunStartInfo, StepInfo, TrainerHooks, TrainResult

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "train_config.yaml"
METRICS_ARTIFACT = "metrics.json"
STEP_SERIES = "step_loss"  # logged at every reported step: its last step is where a run's steps stand
EPOCH_SERIES = "val_f1"  # logged once per epoch, in the one batch that carries all of the epoch's metrics
_MAX_KEPT_ERRORS = 20


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

    The run is not terminated here: the worker logs the model, registers it and then calls
    ``client.set_terminated`` (see :func:`consumer.tracking.mlflow_run_status`).
    """

    def __init__(self, client: MlflowClient, run_id: str, *, step_flush_every: int = 50,
                 step_metric_keys: tuple[str, ...] = ("f1",), max_step_backlog: int = 20,
                 final_flush_timeout_s: float = 300.0) -> None:
        if step_flush_every < 1:
            raise ValueError("step_flush_every must be >= 1")
        self.client = client
        self.run_id = run_id
        self.step_flush_every = step_flush_every
        self.step_metric_keys = step_metric_keys
        self.max_step_backlog = max_step_backlog
        self.final_flush_timeout_s = final_flush_timeout_s
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

    # --- internals ------------------------------------------------------------------------------
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
