#!/usr/bin/env python
"""A worker process for the soak (bench/soak.py): the real worker, a light tracker.

What runs is what ``cdtrain serve --role consumer`` runs: :class:`consumer.worker.TrainingWorker`
under :func:`consumer.roles.run_worker`, on RabbitMQ (``RabbitBus``), claiming jobs in the job
views on MongoDB (nx-27017 here), with its status outbox on local disk and its checkpoints in a
checkpoint store shared by every worker of the soak (a local directory, so any worker resumes any
job). Two things differ, and only to make a job cost well under a second:

- **The tracker** (:class:`TraceTracker`) does not talk to MLflow (whose model export costs
  12–20 s a job on this machine). It appends one JSON line per call to a trace file of its own:
  ``begin`` (``start_run``, the attempt's training starts), ``resume`` (the trainer's start step,
  from ``on_run_start``), ``finish`` (the job's model would be logged and registered: at most once
  per job is the soak's invariant), ``fail`` and ``detach`` (the attempt stopped). Each line is
  one ``os.write`` on an ``O_APPEND`` descriptor, so a SIGKILL leaves whole lines behind.
- **The config** comes from the request (the soak posts a tiny one: ``base_channel`` 4, 32-px
  crops, a few epochs on a 6-pair dataset), and datasets are read from a local directory that
  stands in for the bucket (``--objects``: ``s3://lake/data/`` is ``<objects>/lake/data``).

Settings come from the command line, each defaulting to an environment variable::

    .venv/bin/python bench/soak_worker.py --name w1 --amqp-url amqp://guest:guest@127.0.0.1:5672/ \\
        --prefix soak-1234 --mongo-url mongodb://127.0.0.1:27017 --mongo-db soak_1234 \\
        --objects /tmp/soak/objects --checkpoints /tmp/soak/checkpoints \\
        --work-dir /tmp/soak/w1 --trace /tmp/soak/trace/w1.jsonl --heartbeat 0.5

It logs ``worker consuming train requests`` once it takes requests, and exits 0 on SIGTERM/SIGINT
(the role's stop: running jobs are checkpointed and re-queued, as in production).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.soak_worker")

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


class TraceTracker:
    """A :class:`consumer.worker.JobTracker` that records what each attempt did, and nothing else.

    The run id names the job and the attempt (``<job_id>/<attempt>``): ``finish``, ``fail`` and
    ``detach`` only get the run id, and the soak needs to know which attempt ended.
    """

    def __init__(self, trace: Path, worker: str) -> None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self.worker = worker
        self.pid = os.getpid()

    def record(self, event: str, run_id: str, **fields: Any) -> None:
        job_id, _, attempt = run_id.rpartition("/")
        line = json.dumps({"event": event, "job_id": job_id, "attempt": int(attempt), "worker": self.worker,
                           "pid": self.pid, "t": time.time(), **fields}, separators=(",", ":"))
        with self._lock:  # one whole line per write; O_APPEND keeps the lines of a file whole
            os.write(self._fd, (line + "\n").encode())

    # --- JobTracker ---------------------------------------------------------------------------
    def start_run(self, job: Any, config: Any, attempt: int, dataset: Any = None) -> str:
        run_id = f"{job.job_id}/{attempt}"
        self.record("begin", run_id)
        return run_id

    def hooks(self, run_id: str) -> Any:
        from snunet_cbam.hooks import RunStartInfo, TrainerHooks

        tracker = self

        class Resume(TrainerHooks):
            def on_run_start(self, info: RunStartInfo) -> None:
                tracker.record("resume", run_id, start_step=info.start_step, start_epoch=info.start_epoch,
                               total_steps=info.total_steps)

        return Resume()

    def finish(self, run_id: str, result: Any, job: Any, data_dir: Path, config: Any) -> None:
        self.record("finish", run_id, status=str(result.status), epochs_run=result.epochs_run)
        return None  # nothing registered: no model version in the SUCCEEDED event

    def fail(self, run_id: str, reason: str) -> None:
        self.record("fail", run_id, reason=reason)

    def detach(self, run_id: str) -> None:
        self.record("detach", run_id)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=env("SOAK_WORKER_NAME", "worker"), help="this worker's name (trace, logs)")
    p.add_argument("--amqp-url", default=env("CDTRAIN_BUS_URL", DEFAULT_AMQP_URL))
    p.add_argument("--prefix", default=env("CDTRAIN_TOPOLOGY_PREFIX"), required=env("CDTRAIN_TOPOLOGY_PREFIX") is None,
                   help="topology prefix (the soak's own)")
    p.add_argument("--mongo-url", default=env("CDTRAIN_MONGODB_URL"), required=env("CDTRAIN_MONGODB_URL") is None)
    p.add_argument("--mongo-db", default=env("CDTRAIN_MONGODB_DATABASE"),
                   required=env("CDTRAIN_MONGODB_DATABASE") is None)
    p.add_argument("--objects", type=Path, default=env("SOAK_OBJECTS"), required=env("SOAK_OBJECTS") is None,
                   help="local directory standing in for S3 (bucket = first path component)")
    p.add_argument("--checkpoints", type=Path, default=env("SOAK_CHECKPOINTS"),
                   required=env("SOAK_CHECKPOINTS") is None, help="checkpoint store directory, shared by all workers")
    p.add_argument("--work-dir", type=Path, default=env("SOAK_WORK_DIR"), required=env("SOAK_WORK_DIR") is None,
                   help="this worker's data dir: outbox, dataset cache, run directories")
    p.add_argument("--trace", type=Path, default=env("SOAK_TRACE"), required=env("SOAK_TRACE") is None,
                   help="append-only JSON-lines file of the tracker's calls")
    p.add_argument("--heartbeat", type=float, default=float(env("CDTRAIN_HEARTBEAT_S", "0.5")))
    p.add_argument("--checkpoint-every-s", type=float, default=float(env("CDTRAIN_CHECKPOINT_EVERY_S", "1")))
    p.add_argument("--status-settle-s", type=float, default=float(env("SOAK_STATUS_SETTLE_S", "2")))
    p.add_argument("--reconnect-interval", type=float, default=float(env("SOAK_RECONNECT_S", "0.5")),
                   help="the robust connection's reconnect pace (BusSettings.reconnect_interval)")
    p.add_argument("--log-level", default=env("CDTRAIN_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    # The worker's imports (torch) take seconds on this machine: before connecting anything.
    from consumer.checkpoints import CheckpointStore
    from consumer.roles import run_worker
    from infra.backoff import RetryBackoff
    from consumer.stores import StoreResolver
    from consumer.worker import TrainingWorker, WorkerSettings
    from infra.bus import BusSettings, BusUnavailable
    from infra.bus.rabbit import RabbitBus
    from infra.objects import LocalObjectStore
    from infra.views import MongoJobViewStore
    from schemas.topology import Topology

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    bus = RabbitBus(BusSettings(url=args.amqp_url, app_id=f"soak-{args.name}", connect_timeout=5.0,
                                publish_timeout=5.0, reconnect_interval=args.reconnect_interval),
                    Topology(prefix=args.prefix))
    for attempt in range(30):  # the broker may be restarting while a replacement starts
        try:
            await bus.connect()
            break
        except BusUnavailable as exc:
            if attempt == 29:
                raise
            log.warning("bus not reachable (%s); retrying", exc)
            await asyncio.sleep(1.0)
    views = MongoJobViewStore.connect(args.mongo_url, database=args.mongo_db, serverSelectionTimeoutMS=5000)
    checkpoints = CheckpointStore(LocalObjectStore(args.checkpoints), "checkpoints", "jobs/")
    await checkpoints.check()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    worker = TrainingWorker(
        bus, StoreResolver(LocalObjectStore(args.objects)), TraceTracker(args.trace, args.name),
        WorkerSettings(work_dir=args.work_dir, source=f"/cdtrain/worker/{args.name}",
                       heartbeat_interval=args.heartbeat, checkpoint_every_s=args.checkpoint_every_s,
                       status_settle_s=args.status_settle_s,
                       status_retry=RetryBackoff(first_s=0.1, max_s=1.0),
                       outbox_path=args.work_dir / "status-outbox.sqlite3"),
        views=views, checkpoints=checkpoints)
    try:
        await run_worker(bus, worker, stop)
    finally:
        await bus.close()
        await views.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format=f"%(asctime)s %(levelname)s [{args.name}] %(name)s: %(message)s")
    # One thread per worker process: the soak runs several on two cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
