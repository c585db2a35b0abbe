#!/usr/bin/env python
"""Service latency: POST /train -> 202, bucket event -> QUEUED view, cold start -> /readyz.

One run measures, on this machine:

1. ``POST /train`` -> 202, on the embedded parts (InProcessBus + in-memory view store) and on the
   real parts (RabbitMQ with publisher confirms, on an isolated ``Topology(prefix="bench-<hex>")``,
   + job views in MongoDB on an nx-27017 server this script starts), side by side, with the ratio
   real/embedded. Half the requests carry a fresh ``idempotency_key`` (one more view-store lookup
   before the publish); the table also gives each half.
2. Bucket event -> QUEUED view readable (``GET /train/{id}`` answers 200), on the real parts with
   moto's S3 server (``python -m moto.server``, started here), timed from the start of the object's
   PUT to moto:
   - webhook: after the PUT, a MinIO-shaped notification is POSTed to ``/events/s3`` (what MinIO's
     webhook target does after a PUT);
   - SQS: the bucket notifies an SQS queue on moto (``put_bucket_notification_configuration``), and
     the ingress's own ``SqsBucketPoller`` long-polls it with ``wait_time_s=1``.
   Each path has its own bucket (the webhook's bucket sends no SQS notifications); the two paths
   alternate object by object, after a few untimed objects per path (the S3 and SQS clients and
   their connections are opened lazily by the first one).
3. Cold start: ``cdtrain serve --role ingress`` as a subprocess with only ``CDTRAIN_PORT`` set
   (embedded parts; every other CDTRAIN_*/AWS_*/MLFLOW_* variable removed, a fresh working
   directory, so a fresh ``.cdtrain`` data dir), from ``Popen`` until ``/readyz`` answers 200;
   the same for ``cdtrain serve --role all`` (also the projector and the worker, which imports
   torch and MLflow in a thread). Also reported, from the child's INFO log: when the ingress logged
   "listening", and (``all``) when the worker logged "worker consuming train requests". Roles
   alternate (ingress, all, ingress, ...).

How items 1 and 2 are served: the real app, ``ingress.app.create_app(settings, bus, view_store,
object_store)`` with ``IngressSettings()`` defaults (write-through of the QUEUED view on), on
``aiohttp.web.AppRunner``/``TCPSite`` at 127.0.0.1:<free port>, and a ``Projector`` on
``bus.consume_projector`` (the default prefetch), as ``cdtrain serve`` wires them, so views also come from
the bus events as in production. The client is one ``aiohttp.ClientSession`` (keep-alive), one
request at a time. Client, ingress and projector share this process's event loop (in production
the projector is another process). A view is "readable" when ``GET /train/{id}`` answers 200; the
script polls it every 2 ms (bounded by --event-timeout).

Item 1 runs warm-up requests first (not timed), then the timed requests in blocks that alternate
between the stacks (ABBA order), so a noisy neighbour slows both alike; before each block both
projectors have caught up (every QUEUED event sent so far is handled), so one stack's background
work does not land in the other's timings. Medians and p90 (linear
interpolation) are reported; --json also keeps every sample.

Everything listens on 127.0.0.1 only. At the end the script stops what it started (the app
runners, nx-27017, moto, the cdtrain subprocesses), deletes its RabbitMQ queues and exchanges,
its SQS queue, its buckets and its MongoDB database, and removes its temporary directories.

    .venv/bin/python bench/service_latency.py                      # 40-50 s on 2 cores
    .venv/bin/python bench/service_latency.py --requests 200 --events 30 --starts 3 --json /tmp/lat.json

Needs RabbitMQ on 127.0.0.1:5672 (guest/guest; ``rabbitmq-server -detached`` if it is down), and
the dev extras (nx-27017, moto[server]) in the venv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import core_count, cpu_model  # noqa: E402

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
START_TIMEOUT_S = 30.0
POLL_S = 0.002  # GET /train/{id} polling interval while waiting for a view


# --- small helpers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: list[float]) -> dict[str, Any]:
    """Seconds in, milliseconds out."""
    return {"n": len(xs), "median_ms": statistics.median(xs) * 1e3, "p90_ms": percentile(xs, 0.9) * 1e3,
            "min_ms": min(xs) * 1e3, "max_ms": max(xs) * 1e3}



def masked(url: str) -> str:
    from infra.bus.rabbit import masked_url

    return masked_url(url)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: this process's own children only."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the real parts this script starts (as tests/fixtures/{mongo,s3}.py do, without pytest) ---------
def start_nx(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """nx-27017 on a free port with its own data dir, pid file and log; ``(process, url)``."""
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    beside = Path(sys.executable).with_name("nx-27017")
    exe = str(beside) if beside.exists() else shutil.which("nx-27017")
    if not exe:
        raise SystemExit("nx-27017 is not installed (pip install -e '.[dev]')")
    port = free_port()
    url = f"mongodb://127.0.0.1:{port}"
    with open(data_dir / "nx.console", "ab") as console:
        proc = subprocess.Popen(
            [exe, "--host", "127.0.0.1", "-p", str(port), "--data-dir", str(data_dir),
             "--pid-file", str(data_dir / "nx.pid"), "--log-file", str(data_dir / "nx.log")],
            stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    error = "not tried"
    while time.monotonic() < deadline and proc.poll() is None:
        client: MongoClient[Any] = MongoClient(url, serverSelectionTimeoutMS=500, connectTimeoutMS=500)
        try:
            client.admin.command("ping")
            return proc, url
        except PyMongoError as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            client.close()
        time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"nx-27017 did not start on port {port} (exit {proc.returncode}, {error}):\n"
                       + log_tail(data_dir / "nx.log") + "\n" + log_tail(data_dir / "nx.console"))


def start_moto(log_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m moto.server`` (S3 and SQS) on a free port; ``(process, endpoint_url)``."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = log_dir / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{endpoint}/", timeout=2) as response:  # ListBuckets
                if response.status == 200:
                    return proc, endpoint
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError(f"moto did not start on {endpoint} (exit {proc.returncode}):\n{log_tail(log_path)}")


async def check_rabbit(url: str) -> None:
    import aio_pika

    try:
        conn = await aio_pika.connect(url, timeout=5)
        await conn.close()
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"RabbitMQ is not reachable at {masked(url)} ({type(exc).__name__}: {exc}); "
                         "start it with `rabbitmq-server -detached` (then `rabbitmqctl await_startup`)") from None


async def delete_topology(url: str, topology: Any) -> list[str]:
    """Delete the topology's queues and exchanges; returns what could not be deleted."""
    import aio_pika

    left: list[str] = []
    conn = await aio_pika.connect(url, timeout=5)
    try:
        for name in [q.name for q in topology.queues()]:
            try:
                async with conn.channel() as ch:  # a failed delete closes its channel
                    await ch.queue_delete(name, if_unused=False, if_empty=False)
            except Exception as exc:  # noqa: BLE001
                left.append(f"queue {name}: {exc}")
        for name in [e.name for e in topology.exchanges()]:
            try:
                async with conn.channel() as ch:
                    await ch.exchange_delete(name)
            except Exception as exc:  # noqa: BLE001
                left.append(f"exchange {name}: {exc}")
    finally:
        await conn.close()
    return left


# --- one served stack: bus + view store + object store + the real app + a projector ---------------
@dataclass
class Stack:
    name: str
    bus: Any
    store: Any
    objects: Any
    app: Any = None
    runner: Any = None
    base_url: str = ""
    projector: Any = None
    subscription: Any = None
    accepted: int = 0  # QUEUED events published, i.e. what the projector will be sent
    cleanups: list[Any] = field(default_factory=list)

    @property
    def projected(self) -> int:
        return self.projector.applied + self.projector.ignored


async def serve_stack(stack: Stack, opened: list[Stack]) -> Stack:
    """Connect, wire and serve; the stack goes into ``opened`` first, so a failure half-way is
    still closed by the caller."""
    from aiohttp import web

    from infra.views import Projector
    from ingress.app import create_app
    from ingress.settings import IngressSettings
    from infra.views.projector import DEFAULT_PROJECTOR_PREFETCH
    from schemas.events import StatusEvent

    opened.append(stack)
    bus, store, objects, name = stack.bus, stack.store, stack.objects, stack.name
    await bus.connect()
    await store.ensure_indexes()
    stack.projector = Projector(store)

    async def project(event: StatusEvent, _delivery: Any) -> None:
        await stack.projector.handle(event)

    stack.subscription = await bus.consume_projector(project, model=StatusEvent, prefetch=DEFAULT_PROJECTOR_PREFETCH)
    stack.app = create_app(IngressSettings(instance=f"bench-{name}"), bus, store, objects)
    stack.runner = web.AppRunner(stack.app, shutdown_timeout=5.0)
    await stack.runner.setup()
    site = web.TCPSite(stack.runner, "127.0.0.1", 0)
    await site.start()
    host, port = stack.runner.addresses[0][:2]
    stack.base_url = f"http://{host}:{port}"
    return stack


async def close_stack(stack: Stack) -> list[str]:
    """Every step is tried; returns the ones that failed."""
    steps = [stack.runner.cleanup if stack.runner is not None else None,
             stack.subscription.close if stack.subscription is not None else None,
             stack.bus.close, *reversed(stack.cleanups)]
    failed = []
    for step in steps:
        if step is None:
            continue
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - keep cleaning up
            failed.append(f"{stack.name} stack: {getattr(step, '__qualname__', step)}: {type(exc).__name__}: {exc}")
    return failed


async def wait_projected(stack: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while stack.projected < stack.accepted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stack.name}: the projector handled {stack.projected} of {stack.accepted} "
                               f"QUEUED events within {timeout:g} s")
        await asyncio.sleep(0.005)


# --- 1. POST /train -> 202 -------------------------------------------------------------------------
async def post_once(http: Any, stack: Stack, keyed: bool) -> float:
    body: dict[str, Any] = {"dataset_uri": "s3://datasets/bench/"}
    if keyed:
        body["idempotency_key"] = f"bench-{uuid.uuid4().hex}"
    t0 = time.perf_counter()
    async with http.post(f"{stack.base_url}/train", json=body) as response:
        payload = await response.read()
    elapsed = time.perf_counter() - t0
    if response.status != 202:
        raise RuntimeError(f"{stack.name}: POST /train answered {response.status}: {payload[:300]!r}")
    stack.accepted += 1
    return elapsed


async def bench_post(http: Any, stacks: list[Stack], requests: int, warmup: int, block: int,
                     timeout: float) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {s.name: {"plain": [], "keyed": []} for s in stacks}
    for stack in stacks:
        for i in range(warmup):
            await post_once(http, stack, keyed=bool(i % 2))
        await wait_projected(stack, timeout)
    done = {s.name: 0 for s in stacks}
    rnd = 0
    while any(done[s.name] < requests for s in stacks):
        order = stacks if rnd % 2 == 0 else list(reversed(stacks))  # ABBA
        for stack in order:
            n = min(block, requests - done[stack.name])
            for other in stacks:  # both projectors idle: no background work from the last block
                await wait_projected(other, timeout)
            for _ in range(n):
                keyed = done[stack.name] % 2 == 1
                samples[stack.name]["keyed" if keyed else "plain"].append(await post_once(http, stack, keyed))
                done[stack.name] += 1
        rnd += 1
    for stack in stacks:
        await wait_projected(stack, timeout)
    return samples


# --- 2. bucket event -> QUEUED view readable ------------------------------------------------------
def minio_event(bucket: str, key: str, etag: str, size: int) -> dict[str, Any]:
    """What MinIO's webhook target POSTs after a PUT (key URL-encoded in the record)."""
    name = "s3:ObjectCreated:Put"
    return {
        "EventName": name,
        "Key": f"{bucket}/{key}",
        "Records": [{
            "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
            "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "eventName": name,
            "userIdentity": {"principalId": "minioadmin"},
            "s3": {
                "s3SchemaVersion": "1.0", "configurationId": "Config",
                "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"},
                           "arn": f"arn:aws:s3:::{bucket}"},
                "object": {"key": quote_plus(key), "size": size, "eTag": etag,
                           "contentType": "application/zip", "sequencer": f"{time.time_ns():X}"},
            },
            "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64)"},
        }],
    }


async def wait_view(http: Any, stack: Stack, job_id: str, timeout: float) -> None:
    """Until ``GET /train/{job_id}`` answers 200 (polled every POLL_S)."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"{stack.base_url}/train/{job_id}") as response:
            await response.read()
            if response.status == 200:
                return
            if response.status != 404:
                raise RuntimeError(f"GET /train/{job_id} answered {response.status}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id}: no view within {timeout:g} s")
        await asyncio.sleep(POLL_S)


async def bench_bucket_events(http: Any, stack: Stack, endpoint_url: str, events: int, warmup: int,
                              timeout: float) -> dict[str, dict[str, list[float]]]:
    import aioboto3
    from aiobotocore.config import AioConfig

    from ingress.app import BUCKET_EVENTS
    from ingress.settings import SqsSettings
    from ingress.sqs_poller import SqsBucketPoller
    from ingress.trigger import idempotency_key
    from schemas.bucket_events import ObjectCreated
    from schemas.jobs import new_job_id

    out: dict[str, dict[str, list[float]]] = {p: {"from_put": [], "after_put": [], "put": []}
                                              for p in ("webhook", "sqs")}
    out["webhook"]["post"] = []  # the POST /events/s3 round trip alone
    session = aioboto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                               region_name="us-east-1")
    hook_bucket = f"bench-hook-{uuid.uuid4().hex[:12]}"
    sqs_bucket = f"bench-sqs-{uuid.uuid4().hex[:12]}"
    async with contextlib.AsyncExitStack() as clean:
        s3 = await clean.enter_async_context(session.client(
            "s3", endpoint_url=endpoint_url, config=AioConfig(s3={"addressing_style": "path"})))
        sqs = await clean.enter_async_context(session.client("sqs", endpoint_url=endpoint_url))

        async def drop_bucket(bucket: str) -> None:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket):
                for obj in page.get("Contents", []):
                    await s3.delete_object(Bucket=bucket, Key=obj["Key"])
            await s3.delete_bucket(Bucket=bucket)

        for bucket in (hook_bucket, sqs_bucket):
            await s3.create_bucket(Bucket=bucket)
            clean.push_async_callback(drop_bucket, bucket)
        queue_url = (await sqs.create_queue(QueueName=f"bench-{uuid.uuid4().hex[:12]}"))["QueueUrl"]
        clean.push_async_callback(lambda: sqs.delete_queue(QueueUrl=queue_url))
        arn = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
        await s3.put_bucket_notification_configuration(Bucket=sqs_bucket, NotificationConfiguration={
            "QueueConfigurations": [{
                "QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
                "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "datasets/"}]}},
            }]})
        poller = SqsBucketPoller(sqs, SqsSettings(queue_url=queue_url, endpoint_url=endpoint_url, wait_time_s=1),
                                 stack.app[BUCKET_EVENTS])
        poller.start()
        clean.push_async_callback(poller.close)
        # The s3:TestEvent that configuring the notification sends is handled (deleted) first.
        deadline = time.monotonic() + timeout
        while poller.handled < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the SQS poller did not receive moto's s3:TestEvent")
            await asyncio.sleep(0.01)

        async def put(bucket: str, key: str) -> tuple[float, float, str, int]:
            body = os.urandom(64)  # new content, new ETag: a new job every time
            t0 = time.perf_counter()
            response = await s3.put_object(Bucket=bucket, Key=key, Body=body)
            return t0, time.perf_counter(), response["ETag"], len(body)

        def record(path: str, t0: float, t_put: float, timed: bool) -> None:
            t_end = time.perf_counter()
            if not timed:
                return
            out[path]["from_put"].append(t_end - t0)
            out[path]["after_put"].append(t_end - t_put)
            out[path]["put"].append(t_put - t0)

        async def quiet(sqs_handled: int) -> None:
            # Each object starts on a quiet service: the previous object's QUEUED event has been
            # projected and its SQS message deleted (both happen after its view is readable).
            await wait_projected(stack, timeout)
            deadline = time.monotonic() + timeout
            while poller.handled < sqs_handled:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the SQS poller handled {poller.handled} of {sqs_handled} messages")
                await asyncio.sleep(0.005)

        for i in range(-warmup, events):  # i < 0: warm-up (clients, connections), not timed
            timed = i >= 0
            # webhook: PUT, then the notification MinIO would send, then the view
            await quiet(1 + i + warmup)  # moto's s3:TestEvent + the SQS objects so far
            key = f"datasets/hook-{i:+05d}.zip"
            t0, t_put, etag, size = await put(hook_bucket, key)
            async with http.post(f"{stack.base_url}/events/s3", json=minio_event(hook_bucket, key, etag, size)) as r:
                answer = await r.json()
            if timed:
                out["webhook"]["post"].append(time.perf_counter() - t_put)
            result = answer["results"][0] if r.status == 200 and answer.get("results") else None
            if result is None or result["action"] != "started":
                raise RuntimeError(f"webhook answered {r.status}: {answer}")
            await wait_view(http, stack, result["job_id"], timeout)
            record("webhook", t0, t_put, timed)
            stack.accepted += 1

            # SQS: PUT; moto notifies the queue; the poller starts the job; the view
            await quiet(1 + i + warmup)
            key = f"datasets/sqs-{i:+05d}.zip"
            t0, t_put, etag, _ = await put(sqs_bucket, key)
            job_id = new_job_id(idempotency_key(ObjectCreated(
                bucket=sqs_bucket, key=key, etag=etag.strip('"'), source="aws")))
            await wait_view(http, stack, job_id, timeout)
            record("sqs", t0, t_put, timed)
            stack.accepted += 1
        await wait_projected(stack, timeout)
    return out


# --- 3. cold start -> /readyz ----------------------------------------------------------------------
def cdtrain_command() -> list[str]:
    beside = Path(sys.executable).with_name("cdtrain")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "cdtrain"]


def cold_start(role: str, timeout: float) -> dict[str, Any]:
    """Start ``cdtrain serve --role <role>`` with only CDTRAIN_PORT set; time /readyz 200."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-start-{role}-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDTRAIN_", "AWS_", "MLFLOW_"))}
    env["CDTRAIN_PORT"] = str(port)
    marks: dict[str, float] = {}
    lines: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cdtrain_command(), "serve", "--role", role], cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="replace")

    def read_log() -> None:  # INFO log lines (stderr), timestamped as they arrive
        assert proc.stderr is not None
        for line in proc.stderr:
            now = time.perf_counter() - t0
            lines.append(line.rstrip())
            if "ingress listening on" in line:
                marks.setdefault("listening_s", now)
            elif "worker consuming train requests" in line:
                marks.setdefault("worker_s", now)

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    result: dict[str, Any] = {"role": role}
    try:
        deadline = t0 + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cdtrain serve --role {role} exited with {proc.returncode}:\n"
                                   + "\n".join(lines[-20:]))
            if time.perf_counter() > deadline:
                raise RuntimeError(f"cdtrain serve --role {role}: no /readyz 200 within {timeout:g} s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                    if response.status == 200:
                        result["readyz_s"] = time.perf_counter() - t0
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.02)
        if role == "all":  # the worker's imports (torch, MLflow) and the MLflow store come after
            while "worker_s" not in marks:
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError("cdtrain serve --role all: the worker did not start:\n"
                                       + "\n".join(lines[-20:]))
                time.sleep(0.02)
    finally:
        stop_process(proc, timeout=20)
        reader.join(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)
    result.update(marks)
    return result


# --- report ----------------------------------------------------------------------------------------
def fmt_ms(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def report(results: dict[str, Any]) -> str:
    a = results["args"]
    out = []
    lb = results["loadavg_before"]
    out.append(f"machine: {results['cpu']}, {results['cores']} cores; Python {results['python']}; "
               f"RabbitMQ {results['amqp_url']}; nx-27017 and moto {results['moto_version']} started here")
    out.append(f"load average (1, 5, 15 min) before {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}")
    post = results["post_train"]
    out.append("")
    out.append(f"1. POST /train -> 202: one client (keep-alive), {a['requests']} timed requests per stack after "
               f"{a['warmup']} warm-up, in alternating blocks of {a['block']}; write-through on, projector wired")
    out.append("| requests | embedded median ms | embedded p90 ms | real median ms | real p90 ms "
               "| real/embedded median | real/embedded p90 |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    for label, part in (("all", "all"), ("without idempotency_key", "plain"),
                        ("with a fresh idempotency_key", "keyed")):
        e, r = post["embedded"][part], post["real"][part]
        out.append(f"| {label} (n={e['n']}/{r['n']}) | {fmt_ms(e['median_ms'])} | {fmt_ms(e['p90_ms'])} "
                   f"| {fmt_ms(r['median_ms'])} | {fmt_ms(r['p90_ms'])} "
                   f"| {r['median_ms'] / e['median_ms']:.1f}x | {r['p90_ms'] / e['p90_ms']:.1f}x |")
    out.append("embedded = InProcessBus + in-memory views; real = RabbitMQ (publisher confirms, quorum queue) "
               "+ nx-27017 views")
    ev = results["bucket_events"]
    out.append("")
    out.append(f"2. bucket event -> QUEUED view readable (GET /train/{{id}} 200), real parts + moto S3/SQS, "
               f"{a['events']} objects per path after {a['event_warmup']} warm-up, paths alternating")
    out.append("| path | from PUT start: median ms | p90 ms | after PUT returned: median ms | p90 ms "
               "| the PUT itself: median ms |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    for label, path in (("webhook POST /events/s3 (MinIO-shaped)", "webhook"),
                        ("S3 -> SQS notification -> SqsBucketPoller (wait_time_s=1)", "sqs")):
        p = ev[path]
        out.append(f"| {label} | {fmt_ms(p['from_put']['median_ms'])} | {fmt_ms(p['from_put']['p90_ms'])} "
                   f"| {fmt_ms(p['after_put']['median_ms'])} | {fmt_ms(p['after_put']['p90_ms'])} "
                   f"| {fmt_ms(p['put']['median_ms'])} |")
    out.append(f"SQS/webhook (from PUT start, median): "
               f"{ev['sqs']['from_put']['median_ms'] / ev['webhook']['from_put']['median_ms']:.1f}x; "
               f"the webhook's POST /events/s3 round trip alone: median {fmt_ms(ev['webhook']['post']['median_ms'])} ms, "
               f"p90 {fmt_ms(ev['webhook']['post']['p90_ms'])} ms")
    out.append("(moto queues the SQS message before it answers the PUT, so the poller may start before the PUT "
               "has returned: compare the paths from the PUT's start)")
    cs = results["cold_start"]
    out.append("")
    if not cs:
        out.append("3. cold start: skipped (--starts 0 or --roles '')")
    else:
        out.append(f"3. cold start to /readyz 200, embedded parts (only CDTRAIN_PORT set), {a['starts']} starts "
                   "per role (alternating), seconds from Popen")
        out.append("| command | /readyz 200: median (min-max) | 'ingress listening' logged: median "
                   "| 'worker consuming' logged: median (min-max) |")
        out.append("| --- | --- | --- | --- |")
        for role in ("ingress", "all"):
            c = cs.get(role)
            if not c:
                continue
            ready, listening, worker = c["readyz_s"], c.get("listening_s"), c.get("worker_s")
            cells = [f"cdtrain serve --role {role}",
                     f"{ready['median']:.2f} ({ready['min']:.2f}-{ready['max']:.2f})",
                     f"{listening['median']:.2f}" if listening else "-",
                     f"{worker['median']:.2f} ({worker['min']:.2f}-{worker['max']:.2f})" if worker else "-"]
            out.append("| " + " | ".join(cells) + " |")
        if cs.get("ingress") and cs.get("all"):
            ratio = cs["all"]["readyz_s"]["median"] / cs["ingress"]["readyz_s"]["median"]
            out.append(f"all/ingress (/readyz, median): {ratio:.1f}x")
    la = results["loadavg_after"]
    out.append("")
    out.append(f"load average (1, 5, 15 min) after {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} ({results['cores']} cores); "
               f"whole run {results['wall_s']:.0f} s")
    if results.get("leftovers"):
        out.append("NOT cleaned up: " + "; ".join(results["leftovers"]))
    return "\n".join(out)


def seconds_summary(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


# --- main ------------------------------------------------------------------------------------------
async def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    import aiohttp

    from infra.bus import BusSettings, InProcessBus
    from infra.bus.rabbit import RabbitBus
    from infra.objects import LocalObjectStore, S3ObjectStore, S3Settings
    from infra.views import InMemoryJobViewStore, MongoJobViewStore
    from schemas.topology import Topology

    await check_rabbit(args.amqp_url)
    tmp = Path(tempfile.mkdtemp(prefix="bench-service-latency-"))
    procs: list[subprocess.Popen[Any]] = []
    stacks: list[Stack] = []
    topology = Topology(prefix=f"bench-{uuid.uuid4().hex[:12]}")
    topology_used = False
    leftovers: list[str] = results.setdefault("leftovers", [])
    try:
        (tmp / "nx").mkdir()
        # nx-27017 and moto start in threads while the embedded stack is set up.
        nx_future = asyncio.ensure_future(asyncio.to_thread(start_nx, tmp / "nx"))
        moto_future = asyncio.ensure_future(asyncio.to_thread(start_moto, tmp))
        try:
            await serve_stack(Stack("embedded", InProcessBus(BusSettings(), Topology(prefix="bench")),
                                    InMemoryJobViewStore(), LocalObjectStore(tmp / "objects")), stacks)
        finally:
            started = await asyncio.gather(nx_future, moto_future, return_exceptions=True)
            procs.extend(p[0] for p in started if isinstance(p, tuple))
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        (_, mongo_url), (_, moto_url) = started
        s3_settings = S3Settings(endpoint_url=moto_url, region="us-east-1",
                                 access_key_id="testing", secret_access_key="testing")
        objects = S3ObjectStore(s3_settings)
        database = f"bench_{uuid.uuid4().hex[:12]}"
        store = MongoJobViewStore.connect(mongo_url, database=database, serverSelectionTimeoutMS=10_000)

        async def drop_store() -> None:
            await store.collection.database.client.drop_database(database)
            await store.close()

        topology_used = True
        real = Stack("real", RabbitBus(BusSettings(url=args.amqp_url), topology), store, objects,
                     cleanups=[objects.close, drop_store])
        await serve_stack(real, stacks)

        async with aiohttp.ClientSession() as http:
            print(f"1. POST /train: {args.requests} requests per stack ...", file=sys.stderr, flush=True)
            post = await bench_post(http, stacks, args.requests, args.warmup, args.block, args.event_timeout)
            results["post_train"] = {
                name: {"all": summary(parts["plain"] + parts["keyed"]), "plain": summary(parts["plain"]),
                       "keyed": summary(parts["keyed"]), "samples_s": parts}
                for name, parts in post.items()}
            print(f"2. bucket events: {args.events} objects per path ...", file=sys.stderr, flush=True)
            events = await bench_bucket_events(http, real, moto_url, args.events, args.event_warmup,
                                               args.event_timeout)
            results["bucket_events"] = {
                path: {**{k: summary(v) for k, v in parts.items()}, "samples_s": parts}
                for path, parts in events.items()}
    finally:
        for stack in reversed(stacks):
            leftovers += await close_stack(stack)
        if topology_used:
            try:
                leftovers += await delete_topology(args.amqp_url, topology)
            except Exception as exc:  # noqa: BLE001
                leftovers.append(f"RabbitMQ topology {topology.prefix}: {type(exc).__name__}: {exc}")
        for proc in procs:
            stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def run_cold_starts(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """3. After item 1 and 2's servers are gone, so they do not compete with the imports."""
    print(f"3. cold starts: {args.starts} per role ...", file=sys.stderr, flush=True)
    starts: dict[str, list[dict[str, Any]]] = {role: [] for role in args.roles}
    for _ in range(args.starts):
        for role in args.roles:
            starts[role].append(cold_start(role, args.start_timeout))
    results["cold_start"] = {}
    for role, runs in starts.items():
        entry: dict[str, Any] = {}
        for key in ("readyz_s", "listening_s", "worker_s"):
            xs = [r[key] for r in runs if key in r]
            if xs:
                entry[key] = seconds_summary(xs)
        results["cold_start"][role] = entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="timed POST /train per stack (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed POST /train per stack first (default 20)")
    p.add_argument("--block", type=int, default=20, help="requests per block; blocks alternate stacks (default 20)")
    p.add_argument("--events", type=int, default=30, help="objects per bucket-event path (default 30)")
    p.add_argument("--event-warmup", type=int, default=3, help="untimed objects per path first (default 3)")
    p.add_argument("--starts", type=int, default=3, help="cold starts per role (default 3)")
    p.add_argument("--roles", default="ingress,all", help="roles to cold-start (default ingress,all; '' for none)")
    p.add_argument("--amqp-url", default=DEFAULT_AMQP_URL, help=f"RabbitMQ (default {DEFAULT_AMQP_URL})")
    p.add_argument("--event-timeout", type=float, default=10.0, help="longest wait for one view (s, default 10)")
    p.add_argument("--start-timeout", type=float, default=120.0, help="longest wait for one start (s, default 120)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers (and every sample) here")
    args = p.parse_args(argv)
    args.roles = [r for r in args.roles.split(",") if r]
    for r in args.roles:
        if r not in ("ingress", "all"):
            p.error(f"--roles: unknown role {r!r}")
    if min(args.requests, args.events, args.block) < 1 or min(args.warmup, args.event_warmup, args.starts) < 0:
        p.error("--requests, --events and --block must be >= 1; --warmup, --event-warmup and --starts >= 0")
    if args.starts == 0:
        args.roles = []

    import moto

    results: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu": cpu_model(), "cores": core_count(), "python": platform.python_version(),
        "moto_version": moto.__version__, "amqp_url": masked(args.amqp_url),
        "loadavg_before": os.getloadavg(),
    }
    t0 = time.perf_counter()
    try:
        asyncio.run(run(args, results))
        run_cold_starts(args, results)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: everything started was stopped on the way out
        print("interrupted; what this run started has been stopped", file=sys.stderr)
        return 130
    finally:
        results["loadavg_after"] = os.getloadavg()
        results["wall_s"] = time.perf_counter() - t0
    print(report(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if results.get("leftovers") else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    raise SystemExit(main())
