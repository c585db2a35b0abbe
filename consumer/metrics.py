"""The worker's and the projector's Prometheus metrics (served by infra/metrics.py's MetricsServer).

Worker (:class:`WorkerMetrics`), recorded as jobs run:

- ``cdtrain_worker_jobs_started_total``: jobs this worker claimed and started;
- ``cdtrain_worker_jobs_finished_total{outcome}``: how each claimed job left the worker:
  ``succeeded``, ``failed``, ``cancelled``, ``requeued`` (a shutdown handed it back) or
  ``interrupted`` (a newer attempt took it over, or the handler itself crashed);
- ``cdtrain_worker_jobs_running``: 0 or 1 (one job per GPU);
- ``cdtrain_worker_epoch_seconds``: each epoch's wall time, validation included;
- ``cdtrain_worker_train_samples_per_second``: training throughput over the last reported steps
  (validation excluded), and ``cdtrain_worker_train_samples_total`` for ``rate()``;
- ``cdtrain_worker_gpu_max_memory_allocated_bytes``: ``torch.cuda.max_memory_allocated`` at each
  epoch's end, on a CUDA machine only (absent on CPU).

Projector (:class:`ProjectorMetrics`), read from the projector at scrape time (no work per event):
``cdtrain_projector_events_total{result="applied"|"ignored"}``, ``cdtrain_projector_lag_seconds``
(how far the newest projected event lags behind now while the queue holds events; 0 when caught
up, the watchdog's reading in consumer/sweep_gate.py), ``cdtrain_projector_queue_messages``,
``cdtrain_projector_in_flight`` and ``cdtrain_projector_view_store_up``.

No label carries a job id: a job is a series in MLflow and in the job views, not in Prometheus.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from infra.metrics import PREFIX
from schemas import JobState
from snunet_cbam.hooks import EpochInfo, RunStartInfo, StepInfo, TrainerHooks

if TYPE_CHECKING:
    from consumer.sweep_gate import SweepGate
    from infra.views.projector import Projector

__all__ = ["EPOCH_BUCKETS", "ProjectorMetrics", "WorkerMetrics", "job_outcome"]

log = logging.getLogger(__name__)

# Seconds: a tiny test epoch takes one, a LEVIR-CD epoch on a GPU minutes, a large one hours.
EPOCH_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0)
OUTCOMES = ("succeeded", "failed", "cancelled", "requeued", "interrupted")


def job_outcome(last_state: JobState | None) -> str:
    """How a claimed job left the worker, from the last status it made."""
    if last_state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        return last_state.value
    if last_state == JobState.QUEUED:
        return "requeued"
    return "interrupted"


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.started = Counter(f"{PREFIX}_worker_jobs_started", "Jobs this worker claimed and started",
                               registry=registry)
        self.finished = Counter(f"{PREFIX}_worker_jobs_finished", "Claimed jobs that left this worker, by outcome",
                                ["outcome"], registry=registry)
        for outcome in OUTCOMES:  # every outcome exported from the start, at 0: rate() needs a first sample
            self.finished.labels(outcome)
        self.running = Gauge(f"{PREFIX}_worker_jobs_running", "Jobs this worker is running now", registry=registry)
        self.epoch_seconds = Histogram(f"{PREFIX}_worker_epoch_seconds",
                                       "Wall time of each training epoch, validation included",
                                       buckets=EPOCH_BUCKETS, registry=registry)
        self.samples_per_second = Gauge(f"{PREFIX}_worker_train_samples_per_second",
                                        "Training samples per second over the last reported steps",
                                        registry=registry)
        self.samples = Counter(f"{PREFIX}_worker_train_samples", "Training samples this worker has trained on",
                               registry=registry)
        self._gpu_memory: Gauge | None = None
        self._gpu_lock = threading.Lock()

    def job_started(self) -> None:
        self.started.inc()
        self.running.inc()

    def job_finished(self, last_state: JobState | None) -> None:
        self.running.dec()
        self.finished.labels(job_outcome(last_state)).inc()

    def hooks(self) -> TrainerHooks:
        """Trainer hooks for one job's run (they run in the training thread)."""
        return _MetricsHooks(self)

    def observe_gpu_memory(self) -> None:
        """``torch.cuda.max_memory_allocated`` into its gauge, when CUDA is there."""
        import torch  # the worker's; this module is also imported by the projector, without it

        if not torch.cuda.is_available():
            return
        with self._gpu_lock:
            if self._gpu_memory is None:
                self._gpu_memory = Gauge(f"{PREFIX}_worker_gpu_max_memory_allocated_bytes",
                                         "Peak GPU memory allocated by tensors on the current device",
                                         registry=self.registry)
        self._gpu_memory.set(torch.cuda.max_memory_allocated())


class _MetricsHooks(TrainerHooks):
    """Never lets a metrics problem reach the training: a failure is logged, once."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.batch_size = 0
        self._since: float | None = None
        self._warned = False

    def on_run_start(self, info: RunStartInfo) -> None:
        self.batch_size = int(info.config.get("batch_size") or 0)
        self._since = time.perf_counter()

    def on_step_end(self, info: StepInfo) -> None:
        now = time.perf_counter()
        try:
            samples = info.steps * self.batch_size
            if samples:
                self.metrics.samples.inc(samples)
                if self._since is not None and now > self._since:
                    self.metrics.samples_per_second.set(samples / (now - self._since))
        except Exception:  # noqa: BLE001
            self._warn()
        self._since = now

    def on_epoch_end(self, info: EpochInfo) -> None:
        try:
            self.metrics.epoch_seconds.observe(info.seconds)
            self.metrics.observe_gpu_memory()
        except Exception:  # noqa: BLE001
            self._warn()
        # Validation ran since the last step report: it is not training throughput.
        self._since = time.perf_counter()

    def _warn(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning("worker metrics not recorded", exc_info=True)


class ProjectorMetrics:
    """A collector over a running projector: registered at once, exporting from :meth:`attach` on."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._projector: Projector | None = None
        self._gate: SweepGate | None = None
        registry.register(self)

    def attach(self, projector: Projector, gate: SweepGate | None = None) -> None:
        self._projector, self._gate = projector, gate

    def describe(self) -> list[Metric]:
        return list(self._families(None, None))

    def collect(self) -> Iterator[Metric]:
        if self._projector is not None:
            yield from self._families(self._projector, self._gate)

    @staticmethod
    def _families(projector: Any, gate: Any) -> Iterator[Metric]:
        events = CounterMetricFamily(f"{PREFIX}_projector_events", "Status events projected, by result: applied "
                                     "(the view advanced) or ignored (a duplicate or stale event)",
                                     labels=["result"])
        in_flight = GaugeMetricFamily(f"{PREFIX}_projector_in_flight", "Status events being projected now")
        store_up = GaugeMetricFamily(f"{PREFIX}_projector_view_store_up",
                                     "1 while the view store answers the projector, 0 while it waits for it")
        lag = GaugeMetricFamily(f"{PREFIX}_projector_lag_seconds",
                                "Age of the newest projected event while the queue holds events; 0 when caught up")
        queue = GaugeMetricFamily(f"{PREFIX}_projector_queue_messages",
                                  "Status events waiting in the projector queue, as last counted")
        if projector is not None:
            events.add_metric(["applied"], projector.applied)
            events.add_metric(["ignored"], projector.ignored)
            in_flight.add_metric([], projector.in_flight)
            store_up.add_metric([], 0 if projector.store_down_since is not None else 1)
        yield from (events, in_flight, store_up)
        if gate is not None or projector is None:
            if gate is not None:
                lag.add_metric([], gate.lag())
                if not gate.broker_away:  # a count from before the broker left would be stale
                    queue.add_metric([], gate.backlog)
            yield from (lag, queue)
