#!/usr/bin/env python
"""Event to visible view: the projector's lag at a steady event rate, and its top rate.

What runs (all on 127.0.0.1): the projector role (``consumer.roles.run_projector`` with its
watchdog, as ``cdtrain serve --role projector`` wires it) in this process, on RabbitMQ (a topology
of its own) and job views in MongoDB on an nx-27017 server this script starts; the event load in a
second process (``bench/soak.py generate``): RUNNING events round robin over ``--jobs`` job ids at
``--rate`` per second, each made (its ``time``) just before its publish.

For each ``--prefetch`` value, in one run on a fresh topology and database:

- **Lag at the rate.** ``--seconds`` of load. The lag of an event is the moment its write to the
  store returned (the view shows it from then on) minus its ``time``; the first second is warm-up
  and not counted. Median, p95, p99 and max, with the events the generator could not send on time.
- **Top rate.** ``--backlog`` events published while no projector runs, then the time for the
  projector to write them all: events per second.

The goal (docs/benchmarks.md): p99 ≤ 100 ms at 500 events a second. The lag includes the
generator's publish (confirm) and the broker's delivery: what a subscriber of the views would see.

    .venv/bin/python bench/projector_lag.py                        # about 2 minutes on 2 cores
    .venv/bin/python bench/projector_lag.py --prefetch 64 --rate 800 --json /tmp/lag.json

Needs RabbitMQ on 127.0.0.1:5672 (``make services``) and nx-27017 (the dev extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import core_count, cpu_model  # noqa: E402
from bench.service_latency import delete_topology, percentile, start_nx, stop_process  # noqa: E402
from consumer.roles import run_projector  # noqa: E402
from consumer.watchdog import Watchdog  # noqa: E402
from infra.bus import BusSettings  # noqa: E402
from infra.bus.rabbit import RabbitBus  # noqa: E402
from infra.views import MongoJobViewStore  # noqa: E402
from infra.views.projector import DEFAULT_PROJECTOR_PREFETCH  # noqa: E402
from schemas import JobPhase, JobState, StatusEvent, utc_now  # noqa: E402
from schemas.topology import Topology  # noqa: E402

WARMUP_S = 1.0


class TimedViews:
    """The view store, with the time each status event became visible (its write returned)."""

    def __init__(self, store: MongoJobViewStore) -> None:
        self._store = store
        self.lags: list[tuple[float, float]] = []  # (seconds since start, lag s)
        self.written = 0
        self.started = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def apply(self, event: StatusEvent, **kw: Any) -> bool:
        result = await self._store.apply(event, **kw)
        self.written += 1
        if not kw:  # the watchdog's compare-and-set writes are not events of the load
            self.lags.append((time.monotonic() - self.started, (utc_now() - event.time).total_seconds()))
        return result


def stats_ms(xs: list[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": len(xs), "p50_ms": round(percentile(xs, 0.5) * 1e3, 1), "p95_ms": round(percentile(xs, 0.95) * 1e3, 1),
            "p99_ms": round(percentile(xs, 0.99) * 1e3, 1), "max_ms": round(max(xs) * 1e3, 1)}


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        await asyncio.sleep(0.05)


class Projecting:
    """The projector role on its own bus connection, started and stopped around one measure."""

    def __init__(self, url: str, topology: Topology, views: TimedViews, prefetch: int) -> None:
        self.bus = RabbitBus(BusSettings(url=url, app_id="bench-projector", publish_timeout=5.0), topology)
        self.views, self.prefetch = views, prefetch
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Projecting":
        await self.bus.connect()
        watchdog = Watchdog(self.bus, self.views, stale_after=3600, step_stall=None,  # type: ignore[arg-type]
                            source="/bench/watchdog")
        self.task = asyncio.create_task(run_projector(self.bus, self.views, watchdog, self.stop,  # type: ignore[arg-type]
                                                      sweep_interval=30.0, prefetch=self.prefetch,
                                                      dead_letter_source="/bench/dead-letters"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)
        await self.bus.close()


async def steady_load(url: str, topology: Topology, views: TimedViews, prefetch: int, rate: float,
                      seconds: float, jobs: int) -> dict[str, Any]:
    job_ids = [f"lag-{uuid.uuid4().hex[:12]}" for _ in range(jobs)]
    async with Projecting(url, topology, views, prefetch):
        generator = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "soak.py"), "generate", "--amqp-url", url, "--prefix",
             topology.prefix, "--rate", str(rate), *job_ids],
            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert generator.stdout is not None
        ready = await asyncio.to_thread(generator.stdout.readline)
        if "ready" not in ready:
            stop_process(generator)
            raise RuntimeError(f"the event generator did not start: {ready!r}")
        views.lags.clear()
        views.written = 0
        views.started = t0 = time.monotonic()
        await asyncio.sleep(seconds)
        generator.send_signal(signal.SIGTERM)
        counts = json.loads((await asyncio.to_thread(generator.communicate, timeout=30))[0].strip().splitlines()[-1])
        sent_s = time.monotonic() - t0
        await until(lambda: views.written >= counts["published"], 120, "projecting every published event")
    lags = [lag for at, lag in views.lags if at >= WARMUP_S]
    return {"rate": rate, "seconds": round(sent_s, 1), "published": counts["published"],
            "not_sent_on_time": counts["dropped"], "sent_per_s": round(counts["published"] / sent_s, 1),
            "lag": stats_ms(lags)}


async def top_rate(url: str, topology: Topology, views: TimedViews, prefetch: int, backlog: int,
                   jobs: int) -> dict[str, Any]:
    publisher = RabbitBus(BusSettings(url=url, app_id="bench-backlog", publish_timeout=10.0), topology)
    await publisher.connect()
    job_ids = [f"top-{uuid.uuid4().hex[:12]}" for _ in range(jobs)]
    try:
        limit = asyncio.Semaphore(128)

        async def publish(i: int) -> None:
            async with limit:
                event = StatusEvent.for_job(job_ids[i % jobs], i // jobs + 1, JobState.RUNNING, source="/bench/backlog",
                                            phase=JobPhase.TRAINING, epoch=1, epochs=1000, step=i // jobs + 1)
                await publisher.publish_status(event, event.routing_key, message_id=event.id)

        await asyncio.gather(*(publish(i) for i in range(backlog)))
    finally:
        await publisher.close()
    views.written = 0
    started = time.monotonic()
    async with Projecting(url, topology, views, prefetch):
        await until(lambda: views.written >= backlog, 600, f"projecting a backlog of {backlog} events")
        took = time.monotonic() - started
    return {"backlog": backlog, "seconds": round(took, 2), "events_per_s": round(backlog / took, 1)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": {"cpu": cpu_model(), "cores": core_count()},
                               "params": {"rate": args.rate, "seconds": args.seconds, "jobs": args.jobs,
                                          "backlog": args.backlog}, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="projector-lag-") as tmp:
        nx, mongo_url = start_nx(Path(tmp))
        try:
            for prefetch in args.prefetch:
                topology = Topology(prefix=f"lag-{uuid.uuid4().hex[:8]}")
                store = MongoJobViewStore.connect(mongo_url, database=f"lag_{prefetch}_{uuid.uuid4().hex[:6]}")
                views = TimedViews(store)
                try:
                    steady = await steady_load(args.amqp_url, topology, views, prefetch, args.rate, args.seconds,
                                               args.jobs)
                    top = await top_rate(args.amqp_url, topology, views, prefetch, args.backlog, args.jobs)
                finally:
                    await store.close()
                    await delete_topology(args.amqp_url, topology)
                results["variants"][str(prefetch)] = {"prefetch": prefetch, "steady": steady, "top": top}
                print(f"prefetch {prefetch}: {json.dumps(results['variants'][str(prefetch)])}", flush=True)
        finally:
            stop_process(nx)
    return results


def report(results: dict[str, Any]) -> str:
    p = results["params"]
    lines = [f"projector lag at {p['rate']:.0f} events/s over {p['jobs']} jobs ({p['seconds']:.0f} s), "
             f"top rate from a backlog of {p['backlog']}; {results['machine']['cpu']}, {results['machine']['cores']} cores",
             "| prefetch | sent/s | lag p50 | p95 | p99 | max | top rate |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in results["variants"].values():
        lag = v["steady"]["lag"]
        lines.append(f"| {v['prefetch']} | {v['steady']['sent_per_s']:.0f} | {lag['p50_ms']} ms | {lag['p95_ms']} ms | "
                     f"{lag['p99_ms']} ms | {lag['max_ms']} ms | {v['top']['events_per_s']:.0f} ev/s |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=os.environ.get("CDTRAIN_BUS_URL", "amqp://guest:guest@127.0.0.1:5672/"),
                        help="RabbitMQ (default: $CDTRAIN_BUS_URL or the local broker)")
    parser.add_argument("--rate", type=float, default=500.0, help="events per second of the steady load (500)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the steady load (20)")
    parser.add_argument("--jobs", type=int, default=50, help="job ids the events go round (50)")
    parser.add_argument("--backlog", type=int, default=5000, help="events queued for the top-rate measure (5000)")
    parser.add_argument("--prefetch", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, DEFAULT_PROJECTOR_PREFETCH],
                        help=f"comma-separated prefetch values to compare (1,{DEFAULT_PROJECTOR_PREFETCH}: "
                             "one at a time, and the default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
