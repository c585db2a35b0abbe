"""Prometheus metrics, scraped over HTTP from the real parts: the ingress's /metrics (both buses,
both view stores), the projector's and the worker's server (infra/metrics.py), and one server for
the roles of a ``cdtrain serve`` process. The exposition is parsed with prometheus_client's own
parser, as Prometheus would read it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from cdtrain.serve import serve
from cdtrain.settings import ServiceSettings
from consumer.metrics import ProjectorMetrics, WorkerMetrics
from consumer.roles import run_projector
from consumer.watchdog import Watchdog
from infra.bus import MessageBus
from infra.metrics import MetricsServer, new_registry
from infra.objects import LocalObjectStore
from infra.views import JobViewStore, MongoJobViewStore
from ingress.app import create_app
from ingress.settings import IngressSettings
from schemas import JobState, StatusEvent, TrainJob, TrainRequest
from tests.fixtures.rabbit import BusFactory

TOKEN = "metrics-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample as {(name, labels): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def named(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := await probe()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(0.05)
    return result


async def scrape(url: str) -> tuple[str, Samples]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/plain"
        text = await resp.text()
    return text, parse(text)


# --- the ingress ---------------------------------------------------------------------------------
async def test_ingress_metrics_count_requests_by_route_template_jobs_by_state_and_queues(
        bus_factory: BusFactory, view_store: JobViewStore, tmp_path: Path) -> None:
    bus = await bus_factory()
    settings = IngressSettings(api_token=SecretStr(TOKEN), webhook_token=SecretStr("hook-token"), instance="test",
                               store_timeout_s=3.0)
    registry = new_registry()
    app = create_app(settings, bus, view_store, LocalObjectStore(tmp_path / "objects"), registry=registry)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        job_ids = []
        for n in range(3):
            resp = await client.post("/train", json={"dataset_uri": f"s3://lake/datasets/{n}/"}, headers=AUTH)
            assert resp.status == 202, await resp.text()
            job_ids.append((await resp.json())["job_id"])
        for job_id in job_ids[:2]:
            assert (await client.get(f"/train/{job_id}", headers=AUTH)).status == 200
        assert (await client.get("/train/no-such-job", headers=AUTH)).status == 404
        assert (await client.get("/train")).status == 401  # no token: counted with the status it got
        assert (await client.get("/no/such/path")).status == 404
        assert (await client.put("/train", headers=AUTH)).status == 405

        # Open, although the API token is set: Prometheus scrapes without one.
        resp = await client.get("/metrics")
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    finally:
        await client.close()

    samples = parse(text)
    requests = "cdtrain_http_requests_total"
    assert value(samples, requests, route="/train", method="POST", status="202") == 3
    assert value(samples, requests, route="/train/{job_id}", method="GET", status="200") == 2
    assert value(samples, requests, route="/train/{job_id}", method="GET", status="404") == 1
    assert value(samples, requests, route="/train", method="GET", status="401") == 1
    assert value(samples, requests, route="unmatched", method="GET", status="404") == 1
    assert value(samples, requests, route="unmatched", method="PUT", status="405") == 1
    # The latency histogram has the same labels; its buckets are cumulative.
    latency = "cdtrain_http_request_duration_seconds"
    posts = dict(route="/train", method="POST", status="202")
    assert value(samples, f"{latency}_count", **posts) == 3
    assert value(samples, f"{latency}_bucket", **posts, le="+Inf") == 3
    assert 0 < value(samples, f"{latency}_sum", **posts) < 30
    # No label value names a job or a path as sent: one series per route, whatever the traffic.
    for job_id in job_ids:
        assert job_id not in text
    assert "no-such-job" not in text and "/no/such/path" not in text
    routes = {dict(labels)["route"] for labels in named(samples, requests)}
    assert routes == {"/train", "/train/{job_id}", "unmatched"}

    # Each state is exported, 0 included; the three jobs wait in the request queue.
    assert {dict(k)["state"]: v for k, v in named(samples, "cdtrain_jobs").items()} == {
        **{state.value: 0.0 for state in JobState}, "queued": 3.0}
    assert value(samples, "cdtrain_queue_messages", queue="requests") == 3
    assert value(samples, "cdtrain_queue_messages", queue="projector") == 3  # their QUEUED events
    assert not named(samples, "cdtrain_metrics_source_errors_total")


async def test_a_store_that_does_not_answer_leaves_its_figure_out_in_bounded_time(
        bus_factory: BusFactory, tmp_path: Path) -> None:
    """A real MongoDB driver pointed at a port nobody listens on: the scrape still answers within
    the store timeout, without a jobs-by-state figure, and counts the miss."""
    bus = await bus_factory()
    store = MongoJobViewStore.connect(f"mongodb://127.0.0.1:{free_port()}/", serverSelectionTimeoutMS=30_000)
    settings = IngressSettings(api_token=SecretStr(TOKEN), webhook_token=SecretStr("hook-token"), instance="test",
                               store_timeout_s=0.5)
    app = create_app(settings, bus, store, LocalObjectStore(tmp_path / "objects"), registry=new_registry())
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        started = time.monotonic()
        resp = await client.get("/metrics")
        took = time.monotonic() - started
        samples = parse(await resp.text())
    finally:
        await client.close()
        await store.close()
    assert resp.status == 200 and took < 5, took
    assert not named(samples, "cdtrain_jobs")
    assert value(samples, "cdtrain_metrics_source_errors_total", source="view_store") == 1
    assert value(samples, "cdtrain_queue_messages", queue="requests") == 0  # the broker still answered


# --- the projector -------------------------------------------------------------------------------
async def test_projector_metrics_after_projecting_events(bus: MessageBus, view_store: JobViewStore) -> None:
    registry = new_registry()
    server = MetricsServer(registry, port=0, host="127.0.0.1")
    assert server.start()
    metrics = ProjectorMetrics(registry)
    stop = asyncio.Event()
    watchdog = Watchdog(bus, view_store, stale_after=60)
    role = asyncio.create_task(run_projector(bus, view_store, watchdog, stop, sweep_interval=60, poll_interval=0.05,
                                             metrics=metrics))
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/datasets/p/"))
        queued = StatusEvent.queued(job, source="/test/ingress")
        running = StatusEvent.for_job(job.job_id, queued.sequence + 1, JobState.RUNNING, source="/test/worker")
        for event in (queued, running, running):  # the last one a redelivery: ignored
            await bus.publish_status(event, event.routing_key, message_id=event.id)

        async def projected() -> Samples | None:
            _, samples = await scrape(url)
            done = (value(samples, "cdtrain_projector_events_total", result="applied") == 2
                    and value(samples, "cdtrain_projector_events_total", result="ignored") == 1
                    and value(samples, "cdtrain_projector_lag_seconds") == 0
                    and value(samples, "cdtrain_projector_queue_messages") == 0)
            return samples if done else None

        samples = await until(projected, "the events projected and the queue counted empty")
        assert (await view_store.get(job.job_id)).state == JobState.RUNNING
        assert value(samples, "cdtrain_projector_in_flight") == 0
        assert value(samples, "cdtrain_projector_view_store_up") == 1
    finally:
        stop.set()
        await role
        server.close()


async def test_projector_lag_is_the_age_of_the_newest_event_while_the_queue_holds_events() -> None:
    """The lag reading itself, with the queue counted non-empty: not 0, and close to the event's age."""
    from datetime import timedelta

    from consumer.sweep_gate import SweepGate
    from infra.views import InMemoryJobViewStore, Projector
    from schemas import utc_now

    registry = new_registry()
    metrics = ProjectorMetrics(registry)
    projector = Projector(InMemoryJobViewStore())
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/datasets/l/"))
    queued = StatusEvent.queued(job, source="/test/ingress")
    old = queued.model_copy(update={"time": utc_now() - timedelta(seconds=90)})
    await projector.handle(old)
    gate = SweepGate(None, projector, stale_after=60, poll_interval=1)  # type: ignore[arg-type] - not polled here
    gate.backlog = 5
    metrics.attach(projector, gate)
    from prometheus_client import generate_latest

    samples = parse(generate_latest(registry).decode())
    assert 89 <= value(samples, "cdtrain_projector_lag_seconds") < 120
    assert value(samples, "cdtrain_projector_queue_messages") == 5
    gate.broker_away = True  # a count from before the broker left is not exported
    assert value(parse(generate_latest(registry).decode()), "cdtrain_projector_queue_messages") is None


# --- the worker ----------------------------------------------------------------------------------
@pytest.mark.slow
async def test_worker_metrics_after_a_tiny_job(bus: MessageBus, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from consumer.stores import StoreResolver
    from consumer.tracking.job_tracker import MlflowJobTracker
    from consumer.worker import TrainingWorker, WorkerSettings
    from snunet_cbam.synthetic import make_synthetic_dataset
    from tests.test_worker import TINY

    objects = tmp_path / "objects"
    make_synthetic_dataset(objects / "lake" / "data", pairs=12, size=64, seed=5)
    tracker = MlflowJobTracker(MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "metrics-tests",
                               artifact_location=(tmp_path / "artifacts").as_uri())
    registry = new_registry()
    server = MetricsServer(registry, port=0, host="127.0.0.1")
    assert server.start()
    worker = TrainingWorker(bus, StoreResolver(LocalObjectStore(objects)), tracker,
                            WorkerSettings(work_dir=tmp_path / "work", heartbeat_interval=0.5),
                            metrics=WorkerMetrics(registry))
    url = f"http://127.0.0.1:{server.port}/metrics"
    _, before = await scrape(url)
    assert value(before, "cdtrain_worker_jobs_started_total") == 0
    assert value(before, "cdtrain_worker_jobs_finished_total", outcome="succeeded") == 0

    ended: list[StatusEvent] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        if event.data.state.is_terminal:
            ended.append(event)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    epochs = 2
    await bus.publish_request(TrainJob(request=TrainRequest(
        dataset_uri="s3://lake/data/", config={**TINY, "epochs": epochs, "test_split": None})))
    subscription = await bus.consume_requests(worker.handle, model=TrainJob, prefetch=1)
    try:
        async def finished() -> bool:
            return bool(ended) and worker.idle

        await until(finished, "the job's end", timeout=240)
        _, samples = await scrape(url)
    finally:
        await subscription.close()
        await watcher.close()
        await worker.close()
        server.close()

    assert ended[0].data.state == JobState.SUCCEEDED, ended[0].data.error
    assert value(samples, "cdtrain_worker_jobs_started_total") == 1
    assert value(samples, "cdtrain_worker_jobs_finished_total", outcome="succeeded") == 1
    assert value(samples, "cdtrain_worker_jobs_finished_total", outcome="failed") == 0
    assert value(samples, "cdtrain_worker_jobs_running") == 0
    assert value(samples, "cdtrain_worker_epoch_seconds_count") == epochs
    assert value(samples, "cdtrain_worker_epoch_seconds_sum") > 0
    trained = value(samples, "cdtrain_worker_train_samples_total")
    assert trained is not None and trained > 0 and trained % TINY["batch_size"] == 0
    assert value(samples, "cdtrain_worker_train_samples_per_second") > 0
    import torch

    gpu = value(samples, "cdtrain_worker_gpu_max_memory_allocated_bytes")
    assert (gpu is not None and gpu > 0) if torch.cuda.is_available() else gpu is None


# --- one process, several roles ------------------------------------------------------------------
async def test_serve_shares_one_registry_and_one_metrics_server_among_its_roles(tmp_path: Path) -> None:
    """The ingress and the projector of one ``cdtrain serve`` process (embedded bus): the metrics
    port serves both roles' figures, and so does the ingress's /metrics."""
    metrics_port, http_port = free_port(), free_port()
    settings = ServiceSettings.from_env({
        "CDTRAIN_DATA_DIR": str(tmp_path), "CDTRAIN_PORT": str(http_port), "CDTRAIN_METRICS_PORT": str(metrics_port),
    })
    stop = asyncio.Event()
    urls: list[str] = []
    task = asyncio.create_task(serve(settings, ("ingress", "projector"), stop, on_started=urls.extend))
    try:
        await until(lambda: asyncio.sleep(0, bool(urls)), "the ingress listening")
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{urls[0]}/train", json={"dataset_uri": "s3://lake/datasets/s/"}) as resp:
                assert resp.status == 202, await resp.text()

        async def projected() -> Samples | None:
            _, samples = await scrape(f"http://127.0.0.1:{metrics_port}/metrics")
            # The ingress wrote the QUEUED view itself: its event is projected as a duplicate.
            return samples if value(samples, "cdtrain_projector_events_total", result="ignored") else None

        samples = await until(projected, "the QUEUED event projected")
        assert value(samples, "cdtrain_http_requests_total", route="/train", method="POST", status="202") == 1
        _, from_ingress = await scrape(f"{urls[0]}/metrics")
        assert value(from_ingress, "cdtrain_projector_events_total", result="ignored") == 1
        assert value(from_ingress, "cdtrain_jobs", state="queued") == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    with pytest.raises(aiohttp.ClientError):  # the server went with the process's roles
        await scrape(f"http://127.0.0.1:{metrics_port}/metrics")


def test_a_metrics_port_in_use_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    first = MetricsServer(new_registry(), port=0, host="127.0.0.1")
    assert first.start()
    try:
        second = MetricsServer(new_registry(), port=first.port, host="127.0.0.1")
        assert not second.start()
        assert second.port is None
        assert any("metrics server not started" in r.getMessage() for r in caplog.records)
        second.close()  # nothing to close: no error
    finally:
        first.close()


def test_metrics_port_setting() -> None:
    assert ServiceSettings.from_env({}).metrics_port == 9100
    assert ServiceSettings.from_env({"CDTRAIN_METRICS_PORT": "0"}).metrics_port == 0
    with pytest.raises(ValueError):
        ServiceSettings.from_env({"CDTRAIN_METRICS_PORT": "70000"})
