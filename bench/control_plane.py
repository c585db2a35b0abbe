#!/usr/bin/env python
"""Control plane at concurrency 32: POST /train and GET /train/{id} of the ingress against bare handlers.

One run, on the same RabbitMQ (publisher confirms, an isolated ``Topology(prefix="bench-<hex>")``)
and the same nx-27017 (started here, its own database):

* **bare**: an aiohttp server whose ``POST /train`` validates a ``TrainRequest``, publishes one
  persistent, mandatory message to the requests exchange on a confirming aio-pika channel, awaits
  its confirm and answers 202; its ``GET /train/{id}`` is one ``find_one`` by ``_id``, answered as
  JSON.
* **ingress**: ``ingress.app.create_app(IngressSettings(), RabbitBus, MongoJobViewStore, ...)``, the
  app ``cdtrain serve --role ingress`` serves (no token, no allow list: both are cheap checks).

Each server is its own process (``--serve``); the load is a third process (``--load``): one
``aiohttp.ClientSession`` with keep-alive, ``--concurrency`` requests in flight, ``--requests``
timed requests after ``--warmup`` untimed ones. GETs read real views: ids the ingress accepted in
an untimed seeding run, the same ids for both servers. Rounds alternate the server order (AB, BA,
...); each figure is the median over rounds. Needs RabbitMQ on 127.0.0.1:5672 (guest/guest).

    .venv/bin/python bench/control_plane.py [--rounds 3] [--requests 1000] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
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
from bench.service_latency import (  # noqa: E402
    DEFAULT_AMQP_URL, check_rabbit, delete_topology, percentile, start_nx, stop_process)

POST_BODY = json.dumps({"dataset_uri": "s3://datasets/bench/"}).encode()


# --- servers (child processes) ---------------------------------------------------------------------
async def _bare_app(amqp_url: str, mongo_url: str, database: str, prefix: str) -> Any:
    import aio_pika
    from aiohttp import web
    from pymongo import AsyncMongoClient

    from infra.bus.codec import encode
    from infra.bus.declare import declare_topology
    from schemas.jobs import TrainJob, TrainRequest
    from schemas.topology import Topology

    topology = Topology(prefix=prefix)
    conn = await aio_pika.connect_robust(amqp_url)
    channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
    exchange = (await declare_topology(channel, topology))[topology.requests_exchange.name]
    col = AsyncMongoClient(mongo_url, tz_aware=True)[database]["jobs"]

    async def post(request: web.Request) -> web.Response:
        job = TrainJob(request=TrainRequest.model_validate_json(await request.read()))
        await exchange.publish(aio_pika.Message(encode(job), delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                                message_id=job.job_id), topology.request_routing_key,
                               mandatory=True)
        return web.json_response({"job_id": job.job_id}, status=202)

    async def get(request: web.Request) -> web.Response:
        doc = await col.find_one({"_id": request.match_info["job_id"]})
        if doc is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.Response(body=json.dumps(doc, default=str).encode(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/train", post)
    app.router.add_get("/train/{job_id}", get)
    app.on_cleanup.append(lambda _app: conn.close())
    return app


async def _ingress_app(amqp_url: str, mongo_url: str, database: str, prefix: str, tmp: str) -> Any:
    from infra.bus import BusSettings
    from infra.bus.rabbit import RabbitBus
    from infra.objects import LocalObjectStore
    from infra.views import MongoJobViewStore
    from ingress.app import create_app
    from ingress.settings import IngressSettings
    from schemas.topology import Topology

    bus = RabbitBus(BusSettings(url=amqp_url), Topology(prefix=prefix))
    await bus.connect()
    store = MongoJobViewStore.connect(mongo_url, database=database)
    await store.ensure_indexes()
    app = create_app(IngressSettings(instance="bench-control-plane"), bus, store, LocalObjectStore(Path(tmp)))
    app.on_cleanup.append(lambda _app: bus.close())
    return app


def serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    async def main() -> None:
        if args.serve == "bare":
            app = await _bare_app(args.amqp_url, args.mongo_url, args.database, args.prefix)
        else:
            app = await _ingress_app(args.amqp_url, args.mongo_url, args.database, args.prefix, args.tmp)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes it
        await runner.cleanup()

    asyncio.run(main())
    return 0


# --- load (child process) --------------------------------------------------------------------------
async def _load(base: str, method: str, count: int, warmup: int, concurrency: int,
                ids: list[str]) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    accepted: list[str] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def one(i: int, timed: bool) -> None:
            t0 = time.perf_counter()
            if method == "POST":
                async with http.post(f"{base}/train", data=POST_BODY,
                                     headers={"Content-Type": "application/json"}) as r:
                    body = await r.read()
            else:
                async with http.get(f"{base}/train/{ids[i % len(ids)]}") as r:
                    body = await r.read()
            if timed:
                latencies.append(time.perf_counter() - t0)
            statuses[r.status] = statuses.get(r.status, 0) + 1
            if method == "POST" and r.status == 202:
                accepted.append(json.loads(body)["job_id"])

        async def run(n: int, timed: bool) -> float:
            next_i = iter(range(n))

            async def worker() -> None:
                for i in next_i:
                    await one(i, timed)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - t0

        await run(warmup, False)
        elapsed = await run(count, True)
    return {"elapsed_s": elapsed, "latencies_s": latencies, "statuses": statuses, "accepted": accepted}


def load(args: argparse.Namespace) -> int:
    ids = json.loads(Path(args.ids).read_text()) if args.ids else []
    out = asyncio.run(_load(args.base, args.load, args.requests, args.warmup, args.concurrency, ids))
    Path(args.out).write_text(json.dumps(out))
    return 0


# --- the run (parent) ------------------------------------------------------------------------------
def _start_server(kind: str, args: argparse.Namespace, mongo_url: str, database: str, prefix: str,
                  tmp: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--amqp-url", args.amqp_url, "--mongo-url", mongo_url,
         "--database", database, "--prefix", prefix, "--tmp", str(tmp)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        stop_process(proc)
        raise RuntimeError(f"the {kind} server did not start (exit {proc.poll()})")
    return proc, f"http://127.0.0.1:{json.loads(line)['port']}"


def _stop_server(proc: subprocess.Popen[str]) -> None:
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        stop_process(proc)


def _drive(base: str, method: str, count: int, warmup: int, args: argparse.Namespace, tmp: Path,
           ids_file: Path | None) -> dict[str, Any]:
    out = tmp / f"load-{uuid.uuid4().hex[:8]}.json"
    cmd = [sys.executable, __file__, "--load", method, "--base", base, "--requests", str(count),
           "--warmup", str(warmup), "--concurrency", str(args.concurrency), "--out", str(out)]
    if ids_file is not None:
        cmd += ["--ids", str(ids_file)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    good = 202 if method == "POST" else 200
    if set(result["statuses"]) != {str(good)}:  # JSON keys are strings
        raise RuntimeError(f"{method} {base}: answers {result['statuses']}, expected only {good}")
    return result


def _figures(result: dict[str, Any]) -> dict[str, float]:
    lat = result["latencies_s"]
    return {"req_s": len(lat) / result["elapsed_s"], "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": percentile(lat, 0.99) * 1e3}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pymongo import MongoClient

    from schemas.topology import Topology

    asyncio.run(check_rabbit(args.amqp_url))
    tmp = Path(tempfile.mkdtemp(prefix="bench-control-plane-"))
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    database = f"bench_{uuid.uuid4().hex[:12]}"
    (tmp / "nx").mkdir()
    nx, mongo_url = start_nx(tmp / "nx")
    samples: dict[str, dict[str, list[dict[str, float]]]] = {"bare": {"POST": [], "GET": []},
                                                             "ingress": {"POST": [], "GET": []}}
    try:
        # Seed real views for the GETs: the ingress accepts them (untimed).
        proc, base = _start_server("ingress", args, mongo_url, database, prefix, tmp)
        try:
            ids = _drive(base, "POST", args.requests, 0, args, tmp, None)["accepted"]
        finally:
            _stop_server(proc)
        ids_file = tmp / "ids.json"
        ids_file.write_text(json.dumps(ids))
        for r in range(args.rounds):
            for kind in (("bare", "ingress") if r % 2 == 0 else ("ingress", "bare")):
                proc, base = _start_server(kind, args, mongo_url, database, prefix, tmp)
                try:
                    for method in ("POST", "GET"):
                        fig = _figures(_drive(base, method, args.requests, args.warmup, args, tmp, ids_file))
                        samples[kind][method].append(fig)
                        print(f"round {r + 1} {kind:7} {method:4} {fig['req_s']:7.0f} req/s  "
                              f"p50 {fig['p50_ms']:5.1f} ms  p99 {fig['p99_ms']:5.1f} ms", file=sys.stderr, flush=True)
                finally:
                    _stop_server(proc)
    finally:
        stop_process(nx)
        with MongoClient(mongo_url, serverSelectionTimeoutMS=500) as client:
            try:
                client.drop_database(database)
            except Exception:  # noqa: BLE001 - nx is stopped: its data dir goes below
                pass
        asyncio.run(delete_topology(args.amqp_url, Topology(prefix=prefix)))
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {kind: {method: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
                      for method, runs in methods.items()} for kind, methods in samples.items()}
    ratios = {method: medians["ingress"][method]["req_s"] / medians["bare"][method]["req_s"]
              for method in ("POST", "GET")}
    return {"machine": {"cpu": cpu_model(), "cores": core_count(), "python": platform.python_version()},
            "concurrency": args.concurrency, "requests": args.requests, "rounds": args.rounds,
            "medians": medians, "ratios": ratios, "samples": samples,
            "goals": {"post_ratio_ge_0.60": ratios["POST"] >= 0.60,
                      "post_p99_le_25ms": medians["ingress"]["POST"]["p99_ms"] <= 25.0,
                      "get_ratio_ge_0.80": ratios["GET"] >= 0.80}}


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores, Python {m['python']}; concurrency {res['concurrency']}, "
             f"{res['requests']} timed requests per run, median of {res['rounds']} rounds",
             "| request | server | req/s | p50 ms | p99 ms |", "|---|---|---:|---:|---:|"]
    for method in ("POST", "GET"):
        for kind in ("bare", "ingress"):
            f = res["medians"][kind][method]
            lines.append(f"| {method} | {kind} | {f['req_s']:.0f} | {f['p50_ms']:.1f} | {f['p99_ms']:.1f} |")
    lines.append(f"ingress/bare: POST {res['ratios']['POST']:.0%}, GET {res['ratios']['GET']:.0%}; goals: "
                 + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in res["goals"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=1000, help="timed requests per run")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--json", default=None, help="write the results here")
    # internal: the child processes
    p.add_argument("--serve", choices=("bare", "ingress"), help=argparse.SUPPRESS)
    p.add_argument("--load", choices=("POST", "GET"), help=argparse.SUPPRESS)
    for name in ("--mongo-url", "--database", "--prefix", "--tmp", "--base", "--out", "--ids"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return serve(args)
    if args.load:
        return load(args)
    t0 = time.monotonic()
    res = run(args)
    res["wall_s"] = time.monotonic() - t0
    print(report(res))
    print(f"(the whole run took {res['wall_s']:.0f} s; load average {os.getloadavg()})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
