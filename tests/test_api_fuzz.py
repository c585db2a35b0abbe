"""Property-based fuzzing of the running ingress against its own OpenAPI document (schemathesis).

The ingress runs in this process (``run_ingress``) on the real parts: RabbitMQ, MongoDB (nx-27017)
and moto's S3, with both bearer tokens and an allow-list set. Beside it, a stand-in worker plays
every submitted job through (STARTING, RUNNING with metrics, SUCCEEDED) and a projector applies
those events, so job views move, event streams carry ``status`` events and end; a few finished
jobs are in the views from the start. schemathesis (its CLI, in a subprocess) reads
``/openapi.json``, generates valid and invalid requests for every operation, follows the
document's links (submit, then read, cancel and watch the job) and checks every answer:

- no 5xx (``not_a_server_error``);
- status codes, content types, headers and bodies (event streams included) as documented;
- invalid input refused with a 4xx, a request without its token refused with 401, and an
  undocumented method answered 405 with ``Allow``.

Two checks are off, for reasons of the API, not of the run: ``use_after_free`` (DELETE
/train/{id} cancels a job, which stays readable, so a GET after it rightly answers 200) and
``positive_data_acceptance`` (a TrainRequest has rules JSON Schema cannot state: the config
overrides are checked against the whole training config, cross-key rules included, so a body
valid by the schema may rightly get 422).

Run it alone with ``.venv/bin/python -m pytest tests/test_api_fuzz.py``; a failure prints
schemathesis's report (each problem with a curl command that reproduces it).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from infra.bus import BusSettings, Delivery, MessageBus, create_bus
from infra.objects import S3Settings
from infra.views import MongoJobViewStore, Projector
from ingress.main import run_ingress
from ingress.settings import IngressSettings
from schemas.events import StatusEvent
from schemas.jobs import BucketTrigger, JobState, TrainJob, TrainRequest
from schemas.topology import Topology
from tests.fixtures.rabbit import delete_topology

# About 35 s and 850 requests on a 2-core machine; the timeouts below leave room for a busy one.
MAX_EXAMPLES = 50
SEED = 20240611  # fixed: a failure reproduces with the same requests
REQUEST_TIMEOUT_S = 3.0  # also the longest a live event stream is read
RUN_TIMEOUT_S = 150.0
START_TIMEOUT_S = 15.0
STEP_S = 0.15  # between the stand-in worker's events: streams opened meanwhile see them live
CHECKS_OFF = ("use_after_free", "positive_data_acceptance")
SOURCE = "/cdtrain/worker/fuzz"
# The per-scheme tokens come from the environment, never from the command line.
CONFIG = """
[auth.openapi.apiToken]
bearer = "${CDTRAIN_FUZZ_API_TOKEN}"

[auth.openapi.webhookToken]
bearer = "${CDTRAIN_FUZZ_WEBHOOK_TOKEN}"
"""


def fuzz_settings(amqp_url: str, mongodb_url: str, s3: S3Settings, database: str, prefix: str,
                  api_token: str, webhook_token: str) -> IngressSettings:
    return IngressSettings(
        host="127.0.0.1", port=0, instance="fuzz",
        api_token=SecretStr(api_token), webhook_token=SecretStr(webhook_token),
        allowed_uris="s3://lake/datasets/",  # so that refused locations (403) are exercised too
        bus=BusSettings(url=amqp_url, connect_timeout=3.0, publish_timeout=5.0, reconnect_interval=0.2),
        topology_prefix=prefix, view_store_url=mongodb_url, view_store_database=database, s3=s3,
        sse_heartbeat_s=0.5, store_timeout_s=5.0, retry_after_s=2.0,
    )


class StandInWorker:
    """Reports every job it receives as a worker would, in a few steps, without training."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.tasks: set[asyncio.Task[None]] = set()
        self.played = 0

    async def handle(self, job: TrainJob, delivery: Delivery) -> None:
        task = asyncio.create_task(self.play(job.job_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def play(self, job_id: str) -> None:
        for event in lifecycle(job_id):
            await asyncio.sleep(STEP_S)
            await self.bus.publish_status(event, event.routing_key, message_id=event.id)
        self.played += 1

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def lifecycle(job_id: str, end: JobState = JobState.SUCCEEDED, first: int = 1) -> list[StatusEvent]:
    """STARTING, two RUNNING epochs with metrics (a diverged one among them), then ``end``."""
    run = dict(epochs=2, mlflow_run_id="run-" + job_id[:8])
    events = [
        StatusEvent.for_job(job_id, first, JobState.STARTING, source=SOURCE, phase="downloading", **run),
        StatusEvent.for_job(job_id, first + 1, JobState.RUNNING, source=SOURCE, phase="training", epoch=0, step=10,
                            metrics={"val_f1": 0.5, "train_loss": float("nan")}, **run),
        StatusEvent.for_job(job_id, first + 2, JobState.RUNNING, source=SOURCE, phase="training", epoch=1, step=20,
                            metrics={"val_f1": 0.75, "train_loss": 0.2}, **run),
    ]
    if end is JobState.SUCCEEDED:
        events.append(StatusEvent.for_job(job_id, first + 3, end, source=SOURCE, metrics={"val_f1": 0.75},
                                          model_version="3", model_alias="staging",
                                          model_decision="below the quality gate", **run))
    else:
        events.append(StatusEvent.for_job(job_id, first + 3, end, source=SOURCE, error="CUDA out of memory", **run))
    return events


async def seed_finished_jobs(store: MongoJobViewStore) -> None:
    """Jobs that ended before the run (one from a bucket), so lists, reads, cancels (409) and
    streams (view then end at once) meet every kind of view."""
    trigger = BucketTrigger(bucket="lake", key="datasets/a.zip", etag="abc", event_time="2026-01-01T00:00:00Z")
    for end, source, found in ((JobState.SUCCEEDED, "api", None), (JobState.FAILED, "bucket", trigger)):
        job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/datasets/a.zip", register_model=True),
                       source=source, trigger=found)
        assert await store.create(StatusEvent.queued(job, source="/cdtrain/ingress/seed"))
        for event in lifecycle(job.job_id, end):
            await store.apply(event)


async def run_schemathesis(base_url: str, work: Path, env: dict[str, str]) -> tuple[int, str, dict[str, Any], int]:
    """``st run`` against ``base_url``: exit code, output, JSON report and the number of requests."""
    config = work / "schemathesis.toml"
    config.write_text(CONFIG)
    report, events = work / "report.json", work / "events.ndjson"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
        f"{base_url}/openapi.json",
        "--checks", "all", "--exclude-checks", ",".join(CHECKS_OFF),
        "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--request-timeout", str(REQUEST_TIMEOUT_S),
        "--report", "json,ndjson", "--report-json-path", str(report), "--report-ndjson-path", str(events),
    ]
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=work, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        tail = out.decode(errors="replace")[-6000:]
        pytest.fail(f"schemathesis did not finish within {RUN_TIMEOUT_S:.0f} s:\n{tail}")
    text = out.decode(errors="replace")
    if not report.exists():
        pytest.fail(f"schemathesis wrote no report (exit code {proc.returncode}):\n{text[-6000:]}")
    return proc.returncode or 0, text, json.loads(report.read_text()), count_requests(events)


def count_requests(ndjson: Path) -> int:
    """Requests recorded in schemathesis's event log (one per test case and check request)."""
    total = 0
    for line in ndjson.read_text().splitlines():
        finished = json.loads(line).get("ScenarioFinished")
        if finished:
            total += len((finished.get("recorder") or {}).get("interactions", {}))
    return total


async def started_url(started: asyncio.Future[list[str]], server: asyncio.Task[None]) -> str:
    """The ingress's URL once it listens; fails with its error if it stopped instead."""
    await asyncio.wait({started, server}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if server.done():
        server.result()  # raises what stopped it
        pytest.fail("the ingress stopped before it listened")
    if not started.done():
        pytest.fail(f"the ingress did not listen within {START_TIMEOUT_S:.0f} s")
    return started.result()[0]


@pytest.fixture
async def backend(amqp_url: str, mongodb_url: str) -> AsyncIterator[tuple[Topology, str, MongoJobViewStore]]:
    """A topology and a database of this run's own, removed after it."""
    # The ingress's own topology (its delivery limit): the stand-in worker shares it.
    topology = Topology(prefix=f"test-fuzz-{uuid.uuid4().hex[:12]}")
    database = f"cdtrain_fuzz_{uuid.uuid4().hex[:12]}"
    store = MongoJobViewStore.connect(mongodb_url, database=database)
    await store.ensure_indexes()
    try:
        yield topology, database, store
    finally:
        await store.collection.database.client.drop_database(database)
        await store.close()
        await delete_topology(amqp_url, topology)


@pytest.mark.timeout(240)
async def test_the_running_ingress_conforms_to_its_openapi_document(
        amqp_url: str, mongodb_url: str, s3_settings: S3Settings, tmp_path: Path,
        backend: tuple[Topology, str, MongoJobViewStore]) -> None:
    topology, database, store = backend
    await seed_finished_jobs(store)
    api_token, webhook_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    settings = fuzz_settings(amqp_url, mongodb_url, s3_settings, database, topology.prefix, api_token,
                             webhook_token)
    worker_bus = create_bus(settings.bus, topology)
    await worker_bus.connect()
    worker, projector = StandInWorker(worker_bus), Projector(store)

    async def project(event: StatusEvent, delivery: Delivery) -> None:
        await projector.handle(event)

    await worker_bus.consume_requests(worker.handle, model=TrainJob, prefetch=16)
    await worker_bus.consume_projector(project, model=StatusEvent, prefetch=16)
    stop = asyncio.Event()
    started: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(run_ingress(settings, stop=stop, on_started=started.set_result))
    try:
        base = await started_url(started, server)
        async with aiohttp.ClientSession() as http:
            ready = await http.get(f"{base}/readyz")
            assert ready.status == 200, f"the ingress is not ready to be fuzzed: {await ready.text()}"
        env = {**os.environ, "CDTRAIN_FUZZ_API_TOKEN": api_token, "CDTRAIN_FUZZ_WEBHOOK_TOKEN": webhook_token}
        t0 = time.monotonic()
        code, output, report, requests = await run_schemathesis(base, tmp_path, env)
        print(f"schemathesis: {time.monotonic() - t0:.1f} s, {requests} requests, exit code {code}, "
              f"{worker.played} jobs played through\n{output[-2500:]}")
        assert code == 0, f"schemathesis found problems (exit code {code}):\n{output[-12000:]}"
        assert report["complete"] and not report["failures"] and not report["errors"]
        # Every operation but GET /openapi.json (the document it reads) was exercised.
        assert report["operations"]["tested"] == report["operations"]["total"] >= 10, report["operations"]
        assert all(phase["status"] == "success" for phase in report["phases"].values()), report["phases"]
        assert requests >= 200, f"only {requests} requests"
        assert worker.played > 0, "no submission of the run reached the stand-in worker"
    finally:
        stop.set()
        await asyncio.gather(server, return_exceptions=True)
        await worker.close()
        await worker_bus.close()
