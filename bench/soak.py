#!/usr/bin/env python
"""Soak on loopback: 200 concurrent POST /train under a status-event load, a worker SIGKILLed and
the broker restarted in the middle. Nothing may be lost, nothing trained twice; the projector's
lag is measured.

What runs (all on 127.0.0.1):

- **The ingress** (``ingress.app.create_app``) on ``aiohttp.web.AppRunner`` at a free port, in
  this process, on RabbitMQ (``RabbitBus``, a topology of its own: ``soak-<hex>``) and job views
  in MongoDB on an nx-27017 server this script starts (a database of its own).
- **The projector role** (``consumer.roles.run_projector``) in this process, on its own bus
  connection, with a :class:`consumer.watchdog.Watchdog` of short ``stale_after`` (5 s) sweeping
  every 0.5 s, as ``cdtrain serve --role projector`` wires them (short times for the soak).
- **N workers** (``bench/soak_worker.py`` subprocesses): the real ``TrainingWorker`` under
  ``run_worker``, claiming jobs in the views, a status outbox each, checkpoints in one local
  directory shared by all, and a tracker that appends ``begin``/``finish``/``fail``/``detach``
  lines to a trace file instead of talking to MLflow, so a job (a tiny config on a 6-pair, 64-px
  synthetic dataset) costs well under a second. They run at ``nice 10``: on this shared 2-core
  machine training must not take the CPU from the broker, nx-27017 and the projector, which run on
  other machines in production.
- **The event load** (``python bench/soak.py generate``, a subprocess): RUNNING events, like
  heartbeats, for ``--synthetic-jobs`` job ids (50) at ``--event-rate`` (300/s) through the bus, so
  the projector is loaded. Those jobs have no QUEUED event, so no request, and the watchdog never
  re-queues them. Events it cannot publish (the broker down) are counted and dropped: the rate is
  kept, there is no burst after an outage.

The faults, in this order:

1. once ``--kill-after`` of the accepted jobs ended (0.25), one worker is **SIGKILLed while it
   trains** (its trace shows an attempt begun and not ended) and a replacement is started on the
   same data directory (its outbox: unsent events of the dead process go out first);
2. once ``--restart-after`` of them ended (0.5), **the broker is restarted**: ``rabbitmqctl
   stop_app``, ``--broker-down-s`` of nothing, ``rabbitmqctl start_app``, then until an AMQP
   handshake succeeds. Quorum queues keep their messages across this (checked: 100 of 100).

What is measured:

- **Lag**: for a sample of the event load (every ``--sample-interval``, the 50 views' newest event,
  each event once), the view's ``heard_at`` (the projector's clock when it wrote the event, rule
  6 of ``infra/views/merge.py``) minus the event's ``time`` (the generator's clock when it made
  it, just before its publish). Grouped by the event's time into phases: ``before_faults``,
  ``after_kill`` (the kill to the broker stop), ``broker_restart`` (the stop until the projector
  queue is empty again), ``after_drain``. Median, p95, max.
- **Drain**: from the broker answering again to the projector queue's first empty poll (ready
  messages, ``MessageBus.projector_backlog``, polled every 0.1 s); and to the first sampled event
  whose lag is back under 2x the pre-fault p95.
- **Outcome**: each job's view (state, attempt), the trace (begins and finishes per job, training
  intervals per attempt), the watchdog's re-queues (its log).

Invariants (the exit code is 1 when one fails; each failure is spelled out in ``violations``):
every job answered 202 ends SUCCEEDED; every one of them was finished (the tracker's ``finish``,
where MLflow would log and register the model) exactly once; no two attempts of a job trained
at the same time (attempt intervals from ``begin`` to ``finish``/``fail``/``detach``, or to the
SIGKILL); the killed job was resumed by a later attempt and succeeded.

    .venv/bin/python bench/soak.py                                  # 200 jobs, both faults
    .venv/bin/python bench/soak.py --jobs 50 --no-restart-broker --json /tmp/soak.json

Needs RabbitMQ on 127.0.0.1:5672 with ``rabbitmqctl`` usable by this user (it restarts the
broker's app: every other client of that broker is disconnected for a few seconds), and nx-27017
in the venv. It deletes its queues, exchanges and database at the end, and always runs
``rabbitmqctl start_app`` again if it stopped the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from bench.service_latency import percentile  # noqa: E402

log = logging.getLogger("bench.soak")

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TOKEN = "soak-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONSUMING = "worker consuming train requests"
WORKER_SCRIPT = ROOT / "bench" / "soak_worker.py"
# The job config: a tiny SNUNet-CBAM on CPU (tests/test_cancel.py's TINY, a few epochs).
TINY = {"base_channel": 4, "crop_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu", "compile": False,
        "amp": False, "window_size": 64, "window_overlap": 8, "log_every_steps": 1, "patience": None}
PHASES = ("before_faults", "after_kill", "broker_restart", "after_drain")


# --- parameters and results ------------------------------------------------------------------------
class SoakParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: int = Field(200, ge=1, description="POST /train requests, all in flight at once")
    event_rate: float = Field(300.0, ge=0, description="status events per second from the load generator")
    synthetic_jobs: int = Field(50, ge=1, description="job ids the load generator beats for")
    workers: int = Field(3, ge=1)
    worker_nice: int = Field(10, ge=0, le=19, description="CPU niceness of the worker processes: on a "
                             "shared machine, training must not starve the projector (it runs elsewhere in production)")
    epochs: int = Field(3, ge=1)
    crops_per_image: int = Field(2, ge=1)
    dataset_pairs: int = Field(6, ge=3)
    dataset_size: int = Field(64, ge=32)
    kill: bool = True
    kill_after: float = Field(0.25, ge=0, le=1, description="fraction of accepted jobs ended before the SIGKILL")
    restart_broker: bool = True
    restart_after: float = Field(0.5, ge=0, le=1, description="fraction of accepted jobs ended before the restart")
    broker_down_s: float = Field(1.0, ge=0, description="between stop_app and start_app")
    stale_after: float = Field(5.0, gt=0, description="the watchdog's silence limit")
    sweep_interval: float = Field(0.5, gt=0)
    accept_grace: float = Field(10.0, gt=0, description="the watchdog's wait for an unrecorded confirm")
    heartbeat: float = Field(0.5, gt=0)
    reconnect_interval: float = Field(0.5, gt=0, description="every RabbitBus's robust reconnect pace")
    sample_interval: float = Field(0.25, gt=0)
    time_limit: float = Field(240.0, gt=0, description="seconds from the first POST to give up waiting")
    settle_s: float = Field(2.0, ge=0, description="after every job ended: time for a late duplicate to show")
    amqp_url: str = DEFAULT_AMQP_URL


class LagStats(BaseModel):
    samples: int
    median_ms: float | None = None
    p95_ms: float | None = None
    max_ms: float | None = None


class KillReport(BaseModel):
    worker: str
    pid: int
    job_id: str
    attempt: int
    at_s: float  # since the first POST
    requeued_after_s: float | None = None  # the view at a later attempt
    resumed_after_s: float | None = None  # the next attempt's training began (trace)
    resumed_attempt: int | None = None
    resumed_from_step: int | None = None
    replacement_ready_after_s: float | None = None
    final_state: str | None = None


class RestartReport(BaseModel):
    stop_at_s: float  # since the first POST
    stop_app_s: float
    start_app_s: float
    down_s: float  # stop_app called until an AMQP handshake succeeded again
    backlog_peak: int | None = None  # ready messages in the projector queue after the restart
    drain_s: float | None = None  # broker answering -> projector queue first seen empty
    lag_recovered_s: float | None = None  # broker answering -> first sampled lag under 2x before-p95


class SoakSummary(BaseModel):
    params: SoakParams
    machine: str
    started_at: str
    total_s: float
    workers_ready_s: float
    submitted: int
    http_status: dict[str, int]
    accepted: int
    post_s: LagStats  # 202 round trips (ms)
    all_202_after_s: float
    all_ended_after_s: float | None
    ended: dict[str, int]
    not_ended: list[str]
    not_succeeded: dict[str, str]
    attempts_per_job: dict[str, int]  # attempts (1 + the view's attempt) -> jobs
    begins_per_job: dict[str, int]  # training begins (trace) -> jobs
    finishes_per_job: dict[str, int]  # tracker finishes (trace) -> jobs
    jobs_finished_twice: list[str]
    overlapping_attempts: list[str]
    watchdog_requeues: int
    watchdog_requeued_jobs: list[str]
    watchdog_failed_sweeps: int
    kill: KillReport | None
    restart: RestartReport | None
    lag: dict[str, LagStats]
    # Median lag (ms) of the events made in each 10 s since the first POST, and the projector
    # queue's largest ready count in each (None: the broker did not answer the whole time).
    lag_timeline: list[tuple[int, float | None, int | None]]
    backlog_max: int | None
    events_published: int
    events_dropped: int
    violations: list[str]


# --- small helpers --------------------------------------------------------------------------------
def lag_stats(seconds: list[float]) -> LagStats:
    if not seconds:
        return LagStats(samples=0)
    return LagStats(samples=len(seconds), median_ms=round(statistics.median(seconds) * 1e3, 1),
                    p95_ms=round(percentile(seconds, 0.95) * 1e3, 1), max_ms=round(max(seconds) * 1e3, 1))


def histogram(values: list[int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def amqp_answers(url: str, timeout: float) -> float:
    """Seconds until an AMQP handshake succeeds (raises TimeoutError after ``timeout``)."""
    import aio_pika

    started = time.monotonic()
    while True:
        try:
            conn = await aio_pika.connect(url, timeout=2)
            await conn.close()
            return time.monotonic() - started
        except Exception:  # noqa: BLE001 - not yet
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"RabbitMQ at {url} did not answer within {timeout:g} s") from None
            await asyncio.sleep(0.1)


async def rabbitmqctl(*args: str, timeout: float = 120.0) -> float:
    """Run ``rabbitmqctl <args>``; seconds it took. Raises RuntimeError with its output on failure."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl is not on PATH: the broker cannot be restarted")
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(exe, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} exited {proc.returncode}: {out.decode(errors='replace')}")
    return time.monotonic() - started


def restore_broker(url: str = DEFAULT_AMQP_URL, timeout: float = 120.0) -> None:
    """``rabbitmqctl start_app`` (a no-op on a running app), then wait for port 5672 to answer an
    AMQP handshake. Synchronous: for ``finally`` blocks and tests."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl is not on PATH")
    done = subprocess.run([exe, "start_app"], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl start_app exited {done.returncode}: {done.stdout}{done.stderr}")
    asyncio.run(amqp_answers(url, timeout))


# --- the event load (a subprocess: `python bench/soak.py generate ...`) ------------------------------
async def generate(url: str, prefix: str, job_ids: list[str], rate: float, reconnect_interval: float) -> None:
    """Publish RUNNING events round-robin over ``job_ids`` at ``rate`` per second until SIGTERM;
    then print one JSON line with the counts."""
    from infra.bus import BusSettings, BusUnavailable
    from infra.bus.rabbit import RabbitBus
    from schemas import JobPhase, JobState, StatusEvent
    from schemas.topology import Topology

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus = RabbitBus(BusSettings(url=url, app_id="soak-generator", publish_timeout=5.0,
                                reconnect_interval=reconnect_interval), Topology(prefix=prefix))
    await bus.connect()
    sequences = dict.fromkeys(job_ids, 0)
    counts = Counter()
    in_flight: set[asyncio.Task[None]] = set()
    limit = asyncio.Semaphore(64)

    async def publish(job_id: str) -> None:
        sequences[job_id] += 1
        sequence = sequences[job_id]
        event = StatusEvent.for_job(job_id, sequence, JobState.RUNNING, source="/soak/generator",
                                    phase=JobPhase.TRAINING, epoch=1, epochs=1000, step=sequence)
        try:
            await bus.publish_status(event, event.routing_key, message_id=event.id)
            counts["published"] += 1
        except BusUnavailable:
            counts["dropped"] += 1
        finally:
            limit.release()

    started = time.monotonic()
    made = 0
    print(json.dumps({"ready": True}), flush=True)
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate)
        if due - made > rate:  # more than a second behind (an outage, a stall): keep the rate, no burst
            counts["skipped"] += due - made
            made = due
        while made < due and not stop.is_set():
            await limit.acquire()
            task = asyncio.create_task(publish(job_ids[made % len(job_ids)]))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            made += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)
    await asyncio.gather(*in_flight, return_exceptions=True)
    await bus.close()
    print(json.dumps({"published": counts["published"], "dropped": counts["dropped"] + counts["skipped"]}),
          flush=True)


# --- the driver -----------------------------------------------------------------------------------
@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    trace: Path
    work_dir: Path
    started: float
    killed_at: float | None = None


@dataclass
class TraceRecord:
    event: str
    job_id: str
    attempt: int
    worker: str
    pid: int
    t: float
    extra: dict[str, Any] = field(default_factory=dict)


class WatchdogLog(logging.Handler):
    """Counts the watchdog's re-queues and failed sweeps (its log is what says so)."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.requeued: list[str] = []
        self.failed_sweeps = 0
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "re-queued (attempt" in message:
            self.requeued.append(message.split(":", 1)[0].removeprefix("job ").strip())
        if "watchdog sweep failed" in message:
            self.failed_sweeps += 1
        if record.levelno >= logging.WARNING:
            self.lines.append(f"{time.strftime('%H:%M:%S')} {record.name}: {message}")


class Soak:
    def __init__(self, params: SoakParams, tmp: Path) -> None:
        self.p = params
        self.tmp = tmp
        self.run_id = uuid.uuid4().hex[:10]
        self.prefix = f"soak-{self.run_id}"
        self.database = f"soak_{self.run_id}"
        self.objects = tmp / "objects"
        self.checkpoints = tmp / "checkpoints"
        self.workers: list[Worker] = []
        self.t0 = 0.0  # wall clock (time.time) of the first POST
        self.synthetic_ids = [f"syn-{self.run_id}-{i:03d}" for i in range(params.synthetic_jobs)]
        self.samples: list[tuple[float, float]] = []  # (event time, lag s)
        self.seen: set[tuple[str, int]] = set()
        self.backlog: list[tuple[float, int | None]] = []
        self.accepted: list[str] = []
        self.kill_report: KillReport | None = None
        self.restart_report: RestartReport | None = None
        self.t_kill: float | None = None
        self.t_stop: float | None = None
        self.t_back: float | None = None
        self.t_drained: float | None = None
        self.broker_stopped = False
        self.watchdog_log = WatchdogLog()
        self.generator: subprocess.Popen[str] | None = None
        self.follow_task: asyncio.Task[None] | None = None

    # --- processes ---
    def start_worker(self, name: str, work_dir: Path | None = None) -> Worker:
        work_dir = work_dir or self.tmp / "workers" / name
        trace = self.tmp / "trace" / f"{name}.jsonl"
        log_path = self.tmp / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, str(WORKER_SCRIPT), "--name", name, "--amqp-url", self.p.amqp_url,
                 "--prefix", self.prefix, "--mongo-url", self.mongo_url, "--mongo-db", self.database,
                 "--objects", str(self.objects), "--checkpoints", str(self.checkpoints),
                 "--work-dir", str(work_dir), "--trace", str(trace), "--heartbeat", str(self.p.heartbeat),
                 "--reconnect-interval", str(self.p.reconnect_interval)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=(lambda: os.nice(self.p.worker_nice)) if self.p.worker_nice else None)
        worker = Worker(name, process, log_path, trace, work_dir, time.time())
        self.workers.append(worker)
        return worker

    async def until_consuming(self, worker: Worker, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while CONSUMING not in worker.log.read_text(errors="replace"):
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker {worker.name} exited {worker.process.returncode}:\n{tail(worker.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.name} not consuming after {timeout:g} s:\n{tail(worker.log)}")
            await asyncio.sleep(0.1)

    def trace(self) -> list[TraceRecord]:
        records = []
        for path in sorted((self.tmp / "trace").glob("*.jsonl")):
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                raw = json.loads(line)
                base = {k: raw.pop(k) for k in ("event", "job_id", "attempt", "worker", "pid", "t")}
                records.append(TraceRecord(**base, extra=raw))
        return sorted(records, key=lambda r: r.t)

    # --- monitors ---
    async def sample_lag(self, views: Any, stop: asyncio.Event) -> None:
        """Each poll: the synthetic jobs' views, one sample per event not seen yet."""
        collection = views.collection
        projection = {"updated_at": 1, "heard_at": 1, "last_sequence": 1}
        while not stop.is_set():
            try:
                async for doc in collection.find({"_id": {"$in": self.synthetic_ids}}, projection):
                    key = (doc["_id"], doc["last_sequence"])
                    if key in self.seen or doc.get("heard_at") is None:
                        continue
                    self.seen.add(key)
                    made = _epoch(doc["updated_at"])
                    self.samples.append((made, _epoch(doc["heard_at"]) - made))
            except Exception as exc:  # noqa: BLE001 - a sample missed is not a result
                log.debug("lag sample failed: %s", exc)
            await asyncio.sleep(self.p.sample_interval)

    async def watch_backlog(self, bus: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                ready: int | None = await bus.projector_backlog()
            except Exception:  # noqa: BLE001 - the broker is down
                ready = None
            self.backlog.append((time.time(), ready))
            await asyncio.sleep(0.1)

    async def ended_count(self, views: Any) -> tuple[int, dict[str, str]]:
        states: dict[str, str] = {}
        async for doc in views.collection.find({"_id": {"$in": self.accepted}}, {"state": 1}):
            states[doc["_id"]] = doc["state"]
        return sum(s in ("succeeded", "failed", "cancelled") for s in states.values()), states

    # --- faults ---
    def training_now(self) -> tuple[Worker, TraceRecord] | None:
        """A live worker whose newest attempt has begun and not ended, and whose trainer started its
        steps (the ``resume`` record) 0.1 to 0.5 s ago: it is in the middle of its training steps."""
        open_by_pid: dict[int, tuple[TraceRecord, TraceRecord | None]] = {}
        for record in self.trace():
            current = open_by_pid.get(record.pid)
            same = current is not None and (current[0].job_id, current[0].attempt) == (record.job_id, record.attempt)
            if record.event == "begin":
                open_by_pid[record.pid] = (record, None)
            elif record.event == "resume" and same:
                open_by_pid[record.pid] = (current[0], record)  # type: ignore[index]
            elif record.event in ("finish", "fail", "detach") and same:
                del open_by_pid[record.pid]
        now = time.time()
        for worker in self.workers:
            begun, steps = open_by_pid.get(worker.process.pid, (None, None))
            if (worker.process.poll() is None and worker.killed_at is None and begun is not None
                    and steps is not None and 0.1 <= now - steps.t <= 0.5):
                return worker, begun
        return None

    async def kill_one(self, views: Any) -> None:
        deadline = time.monotonic() + 60
        while (found := self.training_now()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("no worker was seen training for 60 s: nothing to kill")
            await asyncio.sleep(0.02)
        worker, record = found
        worker.process.send_signal(signal.SIGKILL)
        worker.killed_at = self.t_kill = time.time()
        worker.process.wait(10)
        log.warning("SIGKILL worker %s (pid %d) while it trained job %s attempt %d", worker.name,
                    worker.process.pid, record.job_id, record.attempt)
        self.kill_report = KillReport(worker=worker.name, pid=worker.process.pid, job_id=record.job_id,
                                      attempt=record.attempt, at_s=round(self.t_kill - self.t0, 2))
        # A restarted container: same data dir, so the dead process's unsent events go out first.
        replacement = self.start_worker(f"{worker.name}r", work_dir=worker.work_dir)
        self.follow_task = asyncio.create_task(self._follow_kill(views, replacement, record))

    async def _follow_kill(self, views: Any, replacement: Worker, killed: TraceRecord) -> None:
        report = self.kill_report
        assert report is not None and self.t_kill is not None
        with contextlib.suppress(Exception):
            await self.until_consuming(replacement)
            report.replacement_ready_after_s = round(time.time() - self.t_kill, 2)
        from schemas.jobs import attempt_of

        while report.requeued_after_s is None or report.resumed_after_s is None:
            if report.requeued_after_s is None:
                with contextlib.suppress(Exception):
                    view = await views.get(killed.job_id)
                    if view is not None and attempt_of(view.last_sequence) > killed.attempt:
                        report.requeued_after_s = round(time.time() - self.t_kill, 2)
            if report.resumed_after_s is None:
                later = [r for r in self.trace() if r.job_id == killed.job_id and r.attempt > killed.attempt
                         and r.event == "begin"]
                if later:
                    report.resumed_after_s = round(later[0].t - self.t_kill, 2)
                    report.resumed_attempt = later[0].attempt
            await asyncio.sleep(0.1)

    async def restart_broker(self) -> None:
        self.broker_stopped = True
        self.t_stop = time.time()
        log.warning("broker restart: rabbitmqctl stop_app")
        stop_s = await rabbitmqctl("stop_app")
        await asyncio.sleep(self.p.broker_down_s)
        start_s = await rabbitmqctl("start_app")
        await amqp_answers(self.p.amqp_url, 120)
        self.broker_stopped = False
        self.t_back = time.time()
        log.warning("broker answers again after %.1f s", self.t_back - self.t_stop)
        self.restart_report = RestartReport(stop_at_s=round(self.t_stop - self.t0, 2), stop_app_s=round(stop_s, 2),
                                            start_app_s=round(start_s, 2), down_s=round(self.t_back - self.t_stop, 2))

    async def faults(self, views: Any) -> None:
        accepted = len(self.accepted)

        async def until_ended(fraction: float) -> None:
            while (await self.ended_count(views))[0] < fraction * accepted:
                await asyncio.sleep(0.25)

        if self.p.kill:
            await until_ended(self.p.kill_after)
            await self.kill_one(views)
        if self.p.restart_broker:
            await until_ended(self.p.restart_after)
            await self.restart_broker()

    # --- the run ---
    async def run(self) -> SoakSummary:
        import aiohttp
        from aiohttp import web

        from bench.machine import core_count, cpu_model
        from bench.service_latency import delete_topology, start_nx, stop_process
        from consumer.roles import run_projector
        from consumer.watchdog import Watchdog
        from infra.bus import BusSettings
        from infra.bus.rabbit import RabbitBus
        from infra.objects import LocalObjectStore
        from infra.views import MongoJobViewStore, StoreOutage
        from ingress.app import create_app
        from ingress.settings import IngressSettings
        from pydantic import SecretStr
        from schemas.jobs import attempt_of
        from schemas.topology import Topology
        from snunet_cbam.synthetic import make_synthetic_dataset

        p = self.p
        started_at = datetime.now().astimezone().isoformat(timespec="seconds")
        await amqp_answers(p.amqp_url, 5)  # fails with the reason when RabbitMQ is not there
        if p.restart_broker and shutil.which("rabbitmqctl") is None:
            raise RuntimeError("rabbitmqctl is not on PATH: run with --no-restart, or install RabbitMQ's CLI")
        (self.tmp / "nx").mkdir(parents=True)
        nx, self.mongo_url = start_nx(self.tmp / "nx")
        make_synthetic_dataset(self.objects / "lake" / "data", pairs=p.dataset_pairs, size=p.dataset_size, seed=5)
        topology = Topology(prefix=self.prefix)
        logging.getLogger("consumer.watchdog").addHandler(self.watchdog_log)
        # The driver's own log (ingress, projector, watchdog, faults), beside the workers' logs.
        (self.tmp / "logs").mkdir(parents=True, exist_ok=True)
        driver_log = logging.FileHandler(self.tmp / "logs" / "driver.log")
        driver_log.setLevel(logging.INFO)
        driver_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        driver_log.addFilter(lambda record: record.name != "aiohttp.access")
        levels = {name: logging.getLogger(name).level for name in ("consumer", "infra", "ingress", "bench")}
        for name in levels:
            logging.getLogger(name).addHandler(driver_log)
            if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
                logging.getLogger(name).setLevel(logging.INFO)
        views = MongoJobViewStore.connect(self.mongo_url, database=self.database, serverSelectionTimeoutMS=5000)
        settings = BusSettings(url=p.amqp_url, app_id="soak", connect_timeout=5.0, publish_timeout=5.0,
                               reconnect_interval=p.reconnect_interval)
        buses = [RabbitBus(settings, topology) for _ in range(3)]
        ingress_bus, projector_bus, monitor_bus = buses
        stop = asyncio.Event()
        monitors_stop = asyncio.Event()
        tasks: list[asyncio.Task[Any]] = []
        runner = None
        try:
            for bus in buses:
                await bus.connect()  # declares the topology
            await views.ensure_indexes()
            soak_start = time.monotonic()
            for i in range(p.workers):
                self.start_worker(f"w{i + 1}")
            watchdog = Watchdog(projector_bus, views, stale_after=p.stale_after, step_stall=None,
                                accept_grace=p.accept_grace, source="/soak/watchdog")
            caught_up = asyncio.Event()
            projector = asyncio.create_task(run_projector(
                projector_bus, views, watchdog, stop, sweep_interval=p.sweep_interval, caught_up=caught_up,
                poll_interval=0.25, outage=StoreOutage(first_delay=0.1, max_delay=1.0),
                dead_letter_source="/soak/dead-letters"))
            tasks.append(projector)
            ingress = IngressSettings(api_token=SecretStr(TOKEN), instance="soak")
            app = create_app(ingress, ingress_bus, views, LocalObjectStore(self.objects))
            runner = web.AppRunner(app, shutdown_timeout=5.0)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            base_url = f"http://{host}:{port}"
            await asyncio.gather(*(self.until_consuming(w) for w in self.workers))
            workers_ready_s = time.monotonic() - soak_start
            log.info("%d workers consuming after %.1f s", p.workers, workers_ready_s)

            # The event load, then the lag sampler and the backlog monitor.
            self.generator = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "generate", "--amqp-url", p.amqp_url,
                 "--prefix", self.prefix, "--rate", str(p.event_rate), "--reconnect-interval",
                 str(p.reconnect_interval), *self.synthetic_ids],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=open(self.tmp / "logs" / "generator.log", "wb"),  # noqa: SIM115
                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            ready_line = await asyncio.to_thread(self.generator.stdout.readline)
            if "ready" not in ready_line:
                raise RuntimeError(f"the event generator did not start:\n{tail(self.tmp / 'logs' / 'generator.log')}")
            tasks.append(asyncio.create_task(self.sample_lag(views, monitors_stop)))
            tasks.append(asyncio.create_task(self.watch_backlog(monitor_bus, monitors_stop)))
            await asyncio.sleep(2.0)  # the load flows before the burst

            # 200 concurrent POST /train.
            body = {"dataset_uri": "s3://lake/data/",
                    "config": {**TINY, "epochs": p.epochs, "crops_per_image": p.crops_per_image}}
            statuses: Counter[str] = Counter()
            post_times: list[float] = []
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=60)) as http:
                async def post() -> None:
                    t = time.monotonic()
                    try:
                        async with http.post(f"{base_url}/train", json=body, headers=AUTH) as response:
                            answer = await response.json()
                            statuses[str(response.status)] += 1
                            if response.status == 202:
                                post_times.append(time.monotonic() - t)
                                self.accepted.append(answer["job_id"])
                    except Exception as exc:  # noqa: BLE001 - counted, as a client would see it
                        statuses[type(exc).__name__] += 1

                self.t0 = time.time()
                await asyncio.gather(*(post() for _ in range(p.jobs)))
            all_202_after = time.time() - self.t0
            log.info("POSTs answered: %s in %.1f s", dict(statuses), all_202_after)

            fault_task = asyncio.create_task(self.faults(views))
            tasks.append(fault_task)
            deadline = time.monotonic() + p.time_limit
            all_ended_after: float | None = None
            while True:
                ended, _ = await self.ended_count(views)
                if fault_task.done() and fault_task.exception() is not None:
                    raise fault_task.exception()  # type: ignore[misc]
                if ended == len(self.accepted) and fault_task.done():
                    all_ended_after = time.time() - self.t0
                    break
                if time.monotonic() > deadline:
                    log.error("time limit: %d of %d jobs ended", ended, len(self.accepted))
                    break
                await asyncio.sleep(0.25)
            # Drain: the projector queue empty after the broker came back.
            if self.t_back is not None:
                while self.t_drained is None and time.monotonic() < deadline + 30:
                    self.t_drained = next((t for t, ready in self.backlog if t >= self.t_back and ready == 0), None)
                    await asyncio.sleep(0.1)
            await asyncio.sleep(p.settle_s)
            self.generator.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(self.generator.communicate, None, 30)
            counts = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            await asyncio.sleep(2 * p.sample_interval)
            monitors_stop.set()
            total_s = time.time() - self.t0
            _, states = await self.ended_count(views)
            finals = {job_id: await views.get(job_id) for job_id in self.accepted}
            summary = self.summarise(
                started_at=started_at, machine=f"{cpu_model()}, {core_count()} cores", total_s=total_s,
                workers_ready_s=workers_ready_s, statuses=statuses, post_times=post_times,
                all_202_after=all_202_after, all_ended_after=all_ended_after, states=states,
                attempts={j: attempt_of(v.last_sequence) for j, v in finals.items() if v is not None},
                errors={j: (v.error or "") for j, v in finals.items() if v is not None},
                counts=counts)
            return summary
        finally:
            monitors_stop.set()
            stop.set()
            if self.broker_stopped:
                with contextlib.suppress(Exception):
                    await rabbitmqctl("start_app")
                    await amqp_answers(p.amqp_url, 120)
                self.broker_stopped = False
            if self.generator is not None and self.generator.poll() is None:
                self.generator.terminate()
                with contextlib.suppress(Exception):
                    self.generator.wait(15)
                if self.generator.poll() is None:
                    self.generator.kill()
            for worker in self.workers:
                stop_process(worker.process, timeout=20)
            if self.follow_task is not None:
                tasks.append(self.follow_task)
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if runner is not None:
                await runner.cleanup()
            for bus in buses:
                with contextlib.suppress(Exception):
                    await bus.close()
            with contextlib.suppress(Exception):
                left = await delete_topology(p.amqp_url, topology)
                if left:
                    log.error("topology left behind: %s", left)
            with contextlib.suppress(Exception):
                await views.collection.database.client.drop_database(self.database)
            with contextlib.suppress(Exception):
                await views.close()
            stop_process(nx)
            logging.getLogger("consumer.watchdog").removeHandler(self.watchdog_log)
            for name, level in levels.items():
                logging.getLogger(name).removeHandler(driver_log)
                logging.getLogger(name).setLevel(level)
            driver_log.close()

    def summarise(self, *, started_at: str, machine: str, total_s: float, workers_ready_s: float,
                  statuses: Counter[str], post_times: list[float], all_202_after: float,
                  all_ended_after: float | None, states: dict[str, str], attempts: dict[str, int],
                  errors: dict[str, str], counts: dict[str, int]) -> SoakSummary:
        p = self.p
        violations: list[str] = []
        trace = self.trace()
        accepted = set(self.accepted)
        begins: dict[str, list[TraceRecord]] = defaultdict(list)
        finishes: dict[str, list[TraceRecord]] = defaultdict(list)
        for record in trace:
            if record.event == "begin":
                begins[record.job_id].append(record)
            elif record.event == "finish":
                finishes[record.job_id].append(record)

        ended = Counter(states.get(j, "missing") for j in self.accepted)
        not_ended = [j for j in self.accepted if states.get(j) not in ("succeeded", "failed", "cancelled")]
        not_succeeded = {j: f"{states.get(j, 'missing')}: {errors.get(j, '')}" for j in self.accepted
                         if states.get(j) != "succeeded"}
        if not_succeeded:
            violations.append(f"{len(not_succeeded)} of {len(self.accepted)} accepted jobs did not end SUCCEEDED "
                              f"(e.g. {dict(list(not_succeeded.items())[:3])})")
        twice = sorted(j for j in accepted if len(finishes.get(j, [])) > 1)
        never = sorted(j for j in accepted if not finishes.get(j))
        if twice:
            detail = {j: [(r.attempt, r.worker, round(r.t - self.t0, 2)) for r in finishes[j]] for j in twice[:3]}
            violations.append(f"{len(twice)} jobs finished more than once (attempt, worker, s): {detail}")
        if never:
            violations.append(f"{len(never)} accepted jobs never finished: {never[:5]}")
        strangers = sorted(set(finishes) - accepted)
        if strangers:
            violations.append(f"jobs finished that were never accepted: {strangers[:5]}")

        # Training intervals per attempt: begin -> finish/fail/detach of the same process, or its kill.
        killed_at = {w.process.pid: w.killed_at for w in self.workers if w.killed_at is not None}
        ends: dict[tuple[str, int, int], float] = {}
        for record in trace:
            if record.event in ("finish", "fail", "detach"):
                ends.setdefault((record.job_id, record.attempt, record.pid), record.t)
        overlaps: list[str] = []
        for job_id, starts in begins.items():
            spans = []
            for b in starts:
                end = ends.get((job_id, b.attempt, b.pid), killed_at.get(b.pid, float("inf")))
                spans.append((b.t, end, b.attempt, b.worker))
            spans.sort()
            for i, (s1, e1, a1, w1) in enumerate(spans):
                for s2, e2, a2, w2 in spans[i + 1:]:
                    if a1 != a2 and s2 < e1 and s1 < e2:
                        overlaps.append(f"{job_id}: attempt {a1} on {w1} [{s1 - self.t0:.2f}, {e1 - self.t0:.2f}] "
                                        f"and attempt {a2} on {w2} [{s2 - self.t0:.2f}, {e2 - self.t0:.2f}] s")
        if overlaps:
            violations.append(f"{len(overlaps)} pairs of attempts trained the same job at once: {overlaps[:3]}")

        kill = self.kill_report
        if p.kill:
            if kill is None:
                violations.append("no worker was killed")
            else:
                kill.final_state = states.get(kill.job_id)
                later = [r for r in begins.get(kill.job_id, []) if r.attempt > kill.attempt]
                resumes = [r for r in trace if r.event == "resume" and r.job_id == kill.job_id
                           and r.attempt > kill.attempt]
                if resumes:
                    kill.resumed_from_step = int(resumes[0].extra.get("start_step", 0))
                if not later:
                    violations.append(f"the killed job {kill.job_id} (attempt {kill.attempt}) was never resumed "
                                      "by a later attempt")
                if kill.final_state != "succeeded":
                    violations.append(f"the killed job {kill.job_id} ended {kill.final_state}")

        restart = self.restart_report
        if p.restart_broker:
            if restart is None:
                violations.append("the broker was not restarted (the soak ended first)")
            elif self.t_back is not None:
                after = [ready for t, ready in self.backlog if t >= self.t_back and ready is not None]
                restart.backlog_peak = max(after) if after else None
                if self.t_drained is not None:
                    restart.drain_s = round(self.t_drained - self.t_back, 2)
                else:
                    violations.append("the projector queue was never seen empty after the broker restart")

        # Lag by phase of the event's own time.
        t_kill = self.t_kill if self.t_kill is not None else float("inf")
        t_stop = self.t_stop if self.t_stop is not None else float("inf")
        t_drained = self.t_drained if self.t_drained is not None else (self.t_back or float("inf"))
        by_phase: dict[str, list[float]] = {phase: [] for phase in PHASES}
        for made, lag in self.samples:
            if made < min(t_kill, t_stop):
                by_phase["before_faults"].append(lag)
            elif made < t_stop:
                by_phase["after_kill"].append(lag)
            elif made < t_drained:
                by_phase["broker_restart"].append(lag)
            else:
                by_phase["after_drain"].append(lag)
        lag = {phase: lag_stats(values) for phase, values in by_phase.items()}
        lag["all"] = lag_stats([x for _, x in self.samples])
        if restart is not None and self.t_back is not None and lag["before_faults"].p95_ms is not None:
            bound = 2 * lag["before_faults"].p95_ms / 1e3
            recovered = next((made for made, x in sorted(self.samples) if made >= self.t_back and x <= bound), None)
            if recovered is not None:
                restart.lag_recovered_s = round(recovered - self.t_back, 2)
        buckets: dict[int, list[float]] = defaultdict(list)
        for made, x in self.samples:
            buckets[int((made - self.t0) // 10) * 10].append(x)
        ready_by: dict[int, list[int]] = defaultdict(list)
        for t, ready in self.backlog:
            if ready is not None:
                ready_by[int((t - self.t0) // 10) * 10].append(ready)
        timeline = [(b, round(statistics.median(buckets[b]) * 1e3, 1) if buckets.get(b) else None,
                     max(ready_by[b]) if ready_by.get(b) else None)
                    for b in sorted(set(buckets) | set(ready_by)) if b >= 0]
        readies = [r for _, r in self.backlog if r is not None]
        if p.event_rate > 0 and not self.samples:
            violations.append("no lag sample was taken: the event load never reached the views")

        return SoakSummary(
            params=p, machine=machine, started_at=started_at, total_s=round(total_s, 1),
            workers_ready_s=round(workers_ready_s, 1), submitted=p.jobs, http_status=dict(statuses),
            accepted=len(self.accepted), post_s=lag_stats(post_times), all_202_after_s=round(all_202_after, 2),
            all_ended_after_s=round(all_ended_after, 1) if all_ended_after is not None else None,
            ended=dict(ended), not_ended=not_ended, not_succeeded=not_succeeded,
            attempts_per_job=histogram([attempts.get(j, 0) + 1 for j in self.accepted]),
            begins_per_job=histogram([len(begins.get(j, [])) for j in self.accepted]),
            finishes_per_job=histogram([len(finishes.get(j, [])) for j in self.accepted]),
            jobs_finished_twice=twice, overlapping_attempts=overlaps,
            watchdog_requeues=len(self.watchdog_log.requeued),
            watchdog_requeued_jobs=sorted(set(self.watchdog_log.requeued)),
            watchdog_failed_sweeps=self.watchdog_log.failed_sweeps,
            kill=kill, restart=restart, lag=lag, lag_timeline=timeline, backlog_max=max(readies) if readies else None,
            events_published=int(counts.get("published", 0)), events_dropped=int(counts.get("dropped", 0)),
            violations=violations)


def _epoch(value: Any) -> float:
    """A stored time as seconds since the epoch: a datetime, or (nx-27017 returns some that way) its
    ISO text; naive means UTC, as everywhere in the views (schemas.jobs.UtcDatetime)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    return float(value)


def report(summary: SoakSummary) -> str:
    p = summary.params
    lines = [
        f"soak: {summary.accepted}/{summary.submitted} accepted (HTTP {summary.http_status}), "
        f"{p.workers} workers, {p.event_rate:g} events/s over {p.synthetic_jobs} synthetic jobs, "
        f"stale_after {p.stale_after:g} s",
        f"  POST /train 202: median {summary.post_s.median_ms} ms, p95 {summary.post_s.p95_ms} ms, "
        f"max {summary.post_s.max_ms} ms; all answered after {summary.all_202_after_s} s",
        f"  ended: {summary.ended} after {summary.all_ended_after_s} s; total {summary.total_s} s "
        f"(workers ready after {summary.workers_ready_s} s)",
        f"  attempts per job {summary.attempts_per_job}; training begins per job {summary.begins_per_job}; "
        f"finishes per job {summary.finishes_per_job}",
        f"  watchdog: {summary.watchdog_requeues} re-queues {summary.watchdog_requeued_jobs[:6]}, "
        f"{summary.watchdog_failed_sweeps} failed sweeps",
    ]
    if summary.kill:
        lines.append(f"  kill: {summary.kill.model_dump()}")
    if summary.restart:
        lines.append(f"  restart: {summary.restart.model_dump()}")
    lines.append("  lag timeline (s since first POST: median ms, projector queue max): " + ", ".join(
        f"{t}: {m}/{b}" for t, m, b in summary.lag_timeline))
    lines.append(f"  events: {summary.events_published} published, {summary.events_dropped} dropped or not made")
    lines.append("  projector lag (event made -> view written):")
    for phase, stats in summary.lag.items():
        lines.append(f"    {phase:15s} n={stats.samples:5d}  median {stats.median_ms} ms  p95 {stats.p95_ms} ms  "
                     f"max {stats.max_ms} ms")
    lines.append("  violations: " + ("none" if not summary.violations else ""))
    lines.extend(f"    - {v}" for v in summary.violations)
    return "\n".join(lines)


async def run_soak(params: SoakParams, tmp: Path | None = None, keep: bool = False) -> tuple[SoakSummary, Soak]:
    """Run one soak; the summary and the Soak (its logs under ``soak.tmp`` when ``keep``)."""
    own_tmp = tmp is None
    tmp = tmp or Path(tempfile.mkdtemp(prefix="soak-"))
    soak = Soak(params, tmp)
    try:
        return await soak.run(), soak
    finally:
        if own_tmp and not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str]) -> tuple[SoakParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakParams()
    for name, info in SoakParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default,
                                help=info.description)
        else:
            parser.add_argument(flag, dest=name, type=type(default), default=default,
                                help=(info.description or "") + f" (default {default})")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, traces)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    params = SoakParams(**{name: getattr(args, name) for name in SoakParams.model_fields})
    return params, args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:
        gen = argparse.ArgumentParser(prog="soak.py generate")
        gen.add_argument("--amqp-url", required=True)
        gen.add_argument("--prefix", required=True)
        gen.add_argument("--rate", type=float, required=True)
        gen.add_argument("--reconnect-interval", type=float, default=0.5)
        gen.add_argument("job_ids", nargs="+")
        a = gen.parse_args(argv[1:])
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(generate(a.amqp_url, a.prefix, a.job_ids, a.rate, a.reconnect_interval))
        return 0
    params, args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the console; logs/driver.log gets INFO (--keep)
        handler.setLevel(args.log_level)
    summary, soak = asyncio.run(run_soak(params, keep=args.keep))
    print(report(summary))
    if args.keep:
        print(f"logs and traces: {soak.tmp}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(summary.model_dump_json(indent=2))
    return 1 if summary.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
