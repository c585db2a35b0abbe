"""The HTTP edge over real sockets (aiohttp TestServer/TestClient), on both bus and store backends.

``bus`` / ``bus_factory`` are parametrized over the in-process bus and the machine's RabbitMQ,
``view_store`` over memory and MongoDB (nx-27017): each scenario runs on every combination.
A missing service fails the run (the fixtures never skip).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel, SecretStr

from infra.bus import BusSettings, BusUnavailable, Delivery, InProcessBus, MessageBus, Subscription
from infra.bus.base import DeadLetter, Handler
from infra.bus.rabbit import RabbitBus
from infra.objects import LocalObjectStore, ObjectStore
from infra.views import InMemoryJobViewStore, JobViewStore, MongoJobViewStore, Projector
from ingress.app import create_app
from ingress.main import run_ingress
from ingress.settings import IngressSettings
from schemas.events import StatusEvent
from schemas.jobs import ATTEMPT_STRIDE, NOT_ACCEPTED, JobState, TrainJob, TrainRequest, new_job_id
from tests.fixtures.rabbit import BusFactory, delete_topology, new_topology

T = TypeVar("T")
WAIT = 10.0
DATASET = "s3://datasets/levir-cd/"
REPO = Path(__file__).resolve().parents[1]


# --- helpers ------------------------------------------------------------------------------------
def make_settings(**overrides: Any) -> IngressSettings:
    # Short timeouts keep failure scenarios fast; a short heartbeat exercises SSE pings.
    base: dict[str, Any] = dict(store_timeout_s=3.0, retry_after_s=2.0, sse_heartbeat_s=0.5, instance="test")
    return IngressSettings(**{**base, **overrides})




async def eventually(probe: Callable[[], Awaitable[T]], timeout: float = WAIT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def event(job_id: str, sequence: int, state: str, **fields: Any) -> StatusEvent:
    return StatusEvent.for_job(job_id, sequence, state, source="/cdtrain/worker/test", **fields)


Serve = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """``await serve(bus, view_store, settings=..., object_store=...)`` -> a started TestClient."""
    clients: list[TestClient] = []

    async def make(bus: MessageBus, view_store: JobViewStore, *, settings: IngressSettings | None = None,
                   object_store: ObjectStore | None = None) -> TestClient:
        app = create_app(settings or make_settings(), bus, view_store,
                         object_store or LocalObjectStore(tmp_path / "objects"))
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


class RequestSink:
    """A worker stand-in: collects train requests as they reach the consumer."""

    def __init__(self) -> None:
        self.jobs: asyncio.Queue[tuple[TrainJob, Delivery]] = asyncio.Queue()

    async def handle(self, job: TrainJob, delivery: Delivery) -> None:
        await self.jobs.put((job, delivery))

    async def next(self, timeout: float = WAIT) -> tuple[TrainJob, Delivery]:
        return await asyncio.wait_for(self.jobs.get(), timeout)


async def sink_for(bus: MessageBus) -> RequestSink:
    sink = RequestSink()
    await bus.consume_requests(sink.handle, model=TrainJob, prefetch=10)
    return sink


async def wire_projector(bus: MessageBus, store: JobViewStore) -> Projector:
    projector = Projector(store)

    async def project(ev: StatusEvent, delivery: Delivery) -> None:
        await projector.handle(ev)

    await bus.consume_projector(project, model=StatusEvent)
    return projector


class FlakyBus(MessageBus):
    """Delegates to a real bus, but the next ``fail_requests`` / ``fail_status`` publishes raise
    BusUnavailable, as a broker that stops confirming would."""

    def __init__(self, inner: MessageBus, *, fail_requests: int = 0, fail_status: int = 0) -> None:
        self.inner = inner
        self.topology = inner.topology
        self.fail_requests = fail_requests
        self.fail_status = fail_status

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def publish_request(self, payload: BaseModel, *, message_id: str | None = None,
                              headers: Mapping[str, Any] | None = None) -> str:
        if self.fail_requests > 0:
            self.fail_requests -= 1
            raise BusUnavailable("flaky: request not confirmed", retry_after=0.05)
        return await self.inner.publish_request(payload, message_id=message_id, headers=headers)

    async def publish_status(self, payload: BaseModel, routing_key: str, *, message_id: str | None = None,
                             headers: Mapping[str, Any] | None = None) -> str:
        if self.fail_status > 0:
            self.fail_status -= 1
            raise BusUnavailable("flaky: status not confirmed", retry_after=0.05)
        return await self.inner.publish_status(payload, routing_key, message_id=message_id, headers=headers)

    async def consume_requests(self, handler: Handler[Any], *, model: type[Any] | None = None,
                               prefetch: int = 1) -> Subscription:
        return await self.inner.consume_requests(handler, model=model, prefetch=prefetch)

    async def consume_projector(self, handler: Handler[Any], *, model: type[Any] | None = None,
                                prefetch: int = 1) -> Subscription:
        return await self.inner.consume_projector(handler, model=model, prefetch=prefetch)

    async def subscribe_status(self, binding_key: str, handler: Handler[Any], *,
                               model: type[Any] | None = None) -> Subscription:
        return await self.inner.subscribe_status(binding_key, handler, model=model)

    async def request_backlog(self) -> int:
        return await self.inner.request_backlog()

    async def drain_dead_requests(self, max_count: int = 100) -> list[DeadLetter]:
        return await self.inner.drain_dead_requests(max_count)


# --- the dependency rule ------------------------------------------------------------------------
def test_ingress_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import ingress.app, ingress.main, ingress.amqp_listener, ingress.sqs_poller\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'snunet_cbam', 'torchvision'))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # ingress.app alone must not pull in the S3 client either (the slowest import we have).
    code = "import sys, ingress.app; assert 'aioboto3' not in sys.modules and 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# --- POST /train ----------------------------------------------------------------------------------
async def test_post_is_confirmed_published_and_projected(
        bus_factory: BusFactory, view_store: JobViewStore, serve: Serve) -> None:
    """The view the ingress creates and the one the projector makes from the bus are the same."""
    ingress_bus, worker = await bus_factory(), await bus_factory()
    sink = await sink_for(worker)
    projector = await wire_projector(worker, view_store)
    client = await serve(ingress_bus, view_store)

    body = {"dataset_uri": DATASET, "config": {"epochs": 3, "lr": 0.0005}, "register_model": True}
    resp = await client.post("/train", json=body)
    assert resp.status == 202, await resp.text()
    answer = await resp.json()
    job_id = answer["job_id"]
    assert answer == {"job_id": job_id, "status_url": f"/train/{job_id}", "state": "QUEUED", "duplicate": False}
    assert resp.headers["Location"] == f"/train/{job_id}"

    job, delivery = await sink.next()
    assert job.job_id == job_id and delivery.message_id == job_id
    assert job.request == TrainRequest.model_validate(body) and job.source == "api"

    async def projected() -> bool:
        return projector.applied + projector.ignored == 1

    assert await eventually(projected), "the projector never got the QUEUED event"
    view = await (await client.get(f"/train/{job_id}")).json()
    assert view["state"] == "queued" and view["last_sequence"] == 0 and view["source"] == "api"
    assert view["request"]["config"] == {"epochs": 3, "lr": 0.0005}
    # The request's confirm is recorded (rule 11), just after the 202.
    assert await eventually(lambda: accepted_attempt_of(view_store, job_id, 0)), "the confirm was never recorded"
    assert projector.ignored == 1  # the ingress created the view: the bus copy changes nothing


async def test_view_is_readable_right_after_202(bus: MessageBus, view_store: JobViewStore, serve: Serve) -> None:
    client = await serve(bus, view_store)
    resp = await client.post("/train", json={"dataset_uri": DATASET})
    job_id = (await resp.json())["job_id"]
    got = await client.get(f"/train/{job_id}")  # no projector running: the ingress created it
    assert got.status == 200
    view = await got.json()
    assert view["state"] == "queued" and view["request"]["dataset_uri"] == DATASET
    assert await bus.request_backlog() == 1


@pytest.mark.parametrize(("body", "field", "fragment"), [
    ({}, "dataset_uri", "required"),
    ({"dataset_uri": DATASET, "config": {"epochz": 3}}, "config.epochz", "unknown key"),
    ({"dataset_uri": DATASET, "config": {"lr": -0.1}}, "config.lr", "greater than 0"),
    ({"dataset_uri": DATASET, "config": {"batch_size": "big"}}, "config.batch_size", "integer"),
    ({"dataset_uri": DATASET, "colour": "red"}, "colour", "unknown key"),
    ({"dataset_uri": "ftp://x/y"}, "dataset_uri", "unsupported scheme"),
    ({"dataset_uri": DATASET, "config": [1, 2]}, "config", "dictionary"),
    ({"dataset_uri": DATASET, "model_name": "bad name!"}, "model_name", "pattern"),
    ({"dataset_uri": DATASET, "deadline_s": 5}, "deadline_s", "greater than or equal to 60"),
    ({"dataset_uri": DATASET, "deadline_s": "soon"}, "deadline_s", "integer"),
    ([1, 2], "(root)", "JSON object"),
])
async def test_invalid_request_is_422_naming_the_field(body: Any, field: str, fragment: str, serve: Serve) -> None:
    bus = InProcessBus()
    client = await serve(bus, InMemoryJobViewStore())
    resp = await client.post("/train", json=body)
    assert resp.status == 422
    answer = await resp.json()
    assert answer["field"] == field, answer
    assert fragment in answer["error"] and fragment in answer["details"][0]["message"]
    assert {"error", "field", "details"} <= answer.keys()
    assert await bus.request_backlog() == 0


async def test_every_bad_field_is_listed(serve: Serve) -> None:
    client = await serve(InProcessBus(), InMemoryJobViewStore())
    resp = await client.post("/train", json={"config": {"epochz": 1, "lr": -1}, "extra": 1})
    fields = [d["field"] for d in (await resp.json())["details"]]
    assert sorted(fields) == ["config.epochz", "config.lr", "dataset_uri", "extra"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b'{"dataset_uri": "s3://a/b"'])
async def test_malformed_json_is_400(raw: bytes, serve: Serve) -> None:
    client = await serve(InProcessBus(), InMemoryJobViewStore())
    resp = await client.post("/train", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert "not valid JSON" in (await resp.json())["error"]


async def test_closed_bus_is_503_with_retry_after(view_store: JobViewStore, serve: Serve) -> None:
    bus = InProcessBus()
    client = await serve(bus, view_store)
    await bus.close()
    resp = await client.post("/train", json={"dataset_uri": DATASET})
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    answer = await resp.json()
    assert "message bus unavailable" in answer["error"] and answer["retry_after"] >= 1
    # Nothing half-accepted: the job's view says so, and nothing can run it (a claim refuses it).
    [view] = (await view_store.list())[0]
    assert view.state is JobState.FAILED and view.error.startswith("not accepted: the message bus did not confirm")
    assert answer["error"].endswith(f"job {view.job_id} was not accepted; retry in {answer['retry_after']} s")


async def test_unreachable_rabbitmq_is_503(view_store: JobViewStore, serve: Serve) -> None:
    dead = RabbitBus(BusSettings(url=f"amqp://guest:guest@127.0.0.1:{free_port()}/", connect_timeout=1.0,
                                 reconnect_interval=0.5), new_topology())
    client = await serve(dead, view_store)
    started = time.monotonic()
    resp = await client.post("/train", json={"dataset_uri": DATASET})
    assert resp.status == 503 and time.monotonic() - started < 5
    assert resp.headers["Retry-After"] == "1"
    assert "RabbitMQ is unreachable" in (await resp.json())["error"]
    ready = await client.get("/readyz")
    assert ready.status == 503
    body = await ready.json()
    assert body["checks"]["bus"].startswith("down") and body["checks"]["view_store"] == "ok"
    assert "bus" in body["error"]
    await dead.close()


async def test_request_not_confirmed_is_recorded_and_a_retry_runs_it(bus: MessageBus, view_store: JobViewStore,
                                                                     serve: Serve) -> None:
    flaky = FlakyBus(bus, fail_requests=1)
    client = await serve(flaky, view_store)
    resp = await client.post("/train", json={"dataset_uri": DATASET, "idempotency_key": "retry-me"})
    assert resp.status == 503 and "Retry-After" in resp.headers
    job_id = new_job_id("retry-me")
    view = await view_store.get(job_id)
    assert view is not None and view.state is JobState.FAILED and view.error.startswith(NOT_ACCEPTED)
    assert await bus.request_backlog() == 0
    # The client's retry with the same key starts the job's next attempt.
    resp = await client.post("/train", json={"dataset_uri": DATASET, "idempotency_key": "retry-me"})
    assert resp.status == 202 and (await resp.json())["job_id"] == job_id
    assert await bus.request_backlog() == 1
    view = await view_store.get(job_id)
    assert view.state is JobState.QUEUED and view.last_sequence == ATTEMPT_STRIDE and view.error is None


async def test_queued_event_not_confirmed_is_503_and_nothing_is_accepted(bus: MessageBus, view_store: JobViewStore,
                                                                         serve: Serve) -> None:
    """The request goes out with the QUEUED event (their confirms are awaited together), so a
    broker that cannot confirm QUEUED may still hold the request: the job is ended "not accepted",
    and that copy can never run (a worker's claim refuses it). A retry with the same key is the
    job's next attempt."""
    flaky = FlakyBus(bus, fail_status=1)
    client = await serve(flaky, view_store)
    body = {"dataset_uri": DATASET, "idempotency_key": "retry-me"}
    resp = await client.post("/train", json=body)
    assert resp.status == 503 and await bus.request_backlog() == 1
    [view] = (await view_store.list())[0]
    assert view.state is JobState.FAILED and view.error.startswith("not accepted")
    assert not await view_store.claim(event(view.job_id, 1, "starting"))  # the copy in the queue
    again = await client.post("/train", json=body)
    assert again.status == 202 and (await again.json())["job_id"] == view.job_id
    assert await bus.request_backlog() == 2
    view = await view_store.get(view.job_id)
    assert view.state is JobState.QUEUED and view.last_sequence == ATTEMPT_STRIDE
    assert not await view_store.claim(event(view.job_id, 1, "starting"))  # still refused: attempt 0
    assert await eventually(lambda: accepted_attempt_of(view_store, view.job_id, 1)), "the confirm was never recorded"


@pytest.mark.parametrize("which", ["request", "status"])
async def test_a_failed_confirm_under_concurrent_posts_fails_only_that_job(
        which: str, bus: MessageBus, view_store: JobViewStore, serve: Serve) -> None:
    """One of 20 concurrent submissions loses one of its two confirms: that job, and only it,
    is ended FAILED "not accepted" (503); the others are accepted, their confirms recorded."""
    flaky = FlakyBus(bus, **{"request": {"fail_requests": 1}, "status": {"fail_status": 1}}[which])
    client = await serve(flaky, view_store)

    async def post() -> tuple[int, dict[str, Any]]:
        resp = await client.post("/train", json={"dataset_uri": DATASET})
        return resp.status, await resp.json()

    answers = await asyncio.gather(*(post() for _ in range(20)))
    assert sorted(status for status, _ in answers) == [202] * 19 + [503]
    accepted = {body["job_id"] for status, body in answers if status == 202}
    views = {v.job_id: v for v in (await view_store.list(limit=50))[0]}
    assert len(views) == 20 and accepted < set(views)
    [failed] = set(views) - accepted
    assert views[failed].state is JobState.FAILED and views[failed].error.startswith(NOT_ACCEPTED)
    assert all(views[job_id].state is JobState.QUEUED for job_id in accepted)
    for job_id in accepted:
        assert await eventually(lambda: accepted_attempt_of(view_store, job_id, 0)), job_id
    assert (await view_store.get(failed)).accepted_attempt is None


async def test_a_subscriber_sees_queued_before_the_workers_events(bus_factory: BusFactory,
                                                                  view_store: JobViewStore, serve: Serve) -> None:
    """A worker answering at once still comes after QUEUED: it can only see the request after it."""
    ingress_bus, worker_bus, watcher = await bus_factory(), await bus_factory(), await bus_factory()
    seen: list[StatusEvent] = []

    async def on_event(ev: StatusEvent, delivery: Delivery) -> None:
        seen.append(ev)

    async def eager_worker(job: TrainJob, delivery: Delivery) -> None:
        event = StatusEvent.for_job(job.job_id, 1, JobState.STARTING, source="/test/worker")
        await worker_bus.publish_status(event, event.routing_key)

    await watcher.subscribe_status("job.#", on_event, model=StatusEvent)
    await worker_bus.consume_requests(eager_worker, model=TrainJob)
    client = await serve(ingress_bus, view_store)
    ids = [(await (await client.post("/train", json={"dataset_uri": DATASET})).json())["job_id"] for _ in range(20)]
    for _ in range(100):
        if len(seen) == 40:
            break
        await asyncio.sleep(0.05)
    for job_id in ids:
        assert [ev.state for ev in seen if ev.job_id == job_id] == [JobState.QUEUED, JobState.STARTING]


async def test_every_job_is_queued_for_subscribers_before_a_worker_gets_it_under_concurrent_posts(
        bus_factory: BusFactory, view_store: JobViewStore, serve: Serve) -> None:
    """50 concurrent POSTs, each publishing QUEUED and the request back to back: a worker that
    answers every request at once with an event still comes after that job's QUEUED, for a
    subscriber bound before the load. The worker also notes, on each request, whether the
    subscriber had that job's QUEUED already (reported: RabbitMQ routes QUEUED first, but
    delivers the two to different consumers independently)."""
    ingress_bus, worker_bus, watcher = await bus_factory(), await bus_factory(), await bus_factory()
    seen: list[StatusEvent] = []
    requests: list[str] = []
    queued_already = 0

    async def on_event(ev: StatusEvent, delivery: Delivery) -> None:
        seen.append(ev)

    async def eager_worker(job: TrainJob, delivery: Delivery) -> None:
        nonlocal queued_already
        requests.append(job.job_id)
        queued_already += any(ev.job_id == job.job_id and ev.state is JobState.QUEUED for ev in seen)
        event = StatusEvent.for_job(job.job_id, 1, JobState.STARTING, source="/test/worker")
        await worker_bus.publish_status(event, event.routing_key)

    await watcher.subscribe_status("job.#", on_event, model=StatusEvent)
    await worker_bus.consume_requests(eager_worker, model=TrainJob, prefetch=50)
    client = await serve(ingress_bus, view_store)

    async def post() -> str:
        resp = await client.post("/train", json={"dataset_uri": DATASET})
        assert resp.status == 202, await resp.text()
        return (await resp.json())["job_id"]

    ids = await asyncio.gather(*(post() for _ in range(50)))
    assert await eventually(lambda: _true(len(seen) == 100)), f"{len(seen)} of 100 events"
    assert sorted(requests) == sorted(ids)  # every request reached the worker, once
    for job_id in ids:
        assert [ev.state for ev in seen if ev.job_id == job_id] == [JobState.QUEUED, JobState.STARTING], job_id
    print(f"\nthe subscriber had QUEUED already for {queued_already} of 50 requests when the worker got them")


async def _true(value: bool) -> bool:
    return value


async def accepted_attempt_of(view_store: JobViewStore, job_id: str, attempt: int) -> bool:
    view = await view_store.get(job_id)
    return view is not None and view.accepted_attempt == attempt


async def test_view_store_down_is_503_and_not_ready(bus: MessageBus, serve: Serve) -> None:
    dead = MongoJobViewStore.connect(f"mongodb://127.0.0.1:{free_port()}", database="nowhere",
                                     serverSelectionTimeoutMS=300, connectTimeoutMS=300)
    try:
        client = await serve(bus, dead)
        resp = await client.get("/train/" + "a" * 32)
        assert resp.status == 503 and "job view store unavailable" in (await resp.json())["error"]
        resp = await client.post("/train", json={"dataset_uri": DATASET, "idempotency_key": "k"})
        assert resp.status == 503  # the duplicate check cannot run: nothing is published
        assert await bus.request_backlog() == 0
        ready = await client.get("/readyz")
        assert ready.status == 503
        checks = (await ready.json())["checks"]
        assert checks["bus"] == "ok" and checks["view_store"].startswith("down")
    finally:
        await dead.close()


async def test_readyz_and_healthz(bus: MessageBus, view_store: JobViewStore, serve: Serve) -> None:
    client = await serve(bus, view_store, settings=make_settings(api_token=SecretStr("s3cret")))
    assert (await client.get("/healthz")).status == 200  # open even with an API token
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready", "checks": {"bus": "ok", "view_store": "ok"}, "error": None}


# --- idempotency ----------------------------------------------------------------------------------
async def test_idempotency_key_returns_the_existing_job(bus: MessageBus, view_store: JobViewStore,
                                                        serve: Serve) -> None:
    client = await serve(bus, view_store)
    body = {"dataset_uri": DATASET, "idempotency_key": "nightly-2026-11-27"}
    first = await client.post("/train", json=body)
    assert first.status == 202
    job_id = (await first.json())["job_id"]
    again = await client.post("/train", json=body)
    assert again.status == 200
    assert await again.json() == {"job_id": job_id, "status_url": f"/train/{job_id}", "state": "QUEUED",
                                  "duplicate": True}
    # The answer follows the job's current state.
    await view_store.apply(event(job_id, 1, "running", epoch=0, epochs=3))
    assert (await (await client.post("/train", json=body)).json())["state"] == "RUNNING"
    assert await bus.request_backlog() == 1

    other = await client.post("/train", json={**body, "config": {"epochs": 1}})
    assert other.status == 409
    assert (await other.json())["job_id"] == job_id
    assert await bus.request_backlog() == 1


async def test_concurrent_duplicates_start_one_job(bus: MessageBus, view_store: JobViewStore, serve: Serve) -> None:
    client = await serve(bus, view_store)
    body = {"dataset_uri": DATASET, "idempotency_key": "double-click"}
    responses = await asyncio.gather(*(client.post("/train", json=body) for _ in range(8)))
    assert sorted(r.status for r in responses) == [200] * 7 + [202]
    assert len({(await r.json())["job_id"] for r in responses}) == 1
    assert await bus.request_backlog() == 1


async def test_key_known_only_to_the_view_store_is_a_duplicate(bus: MessageBus, view_store: JobViewStore,
                                                              serve: Serve) -> None:
    """A job another producer submitted (id not derived from the key) is found by its key."""
    job = TrainJob(job_id="legacy-job-1", request=TrainRequest(dataset_uri=DATASET, idempotency_key="old-key"))
    await view_store.apply(StatusEvent.queued(job, source="/cdtrain/cli/laptop"))
    client = await serve(bus, view_store)
    resp = await client.post("/train", json={"dataset_uri": DATASET, "idempotency_key": "old-key"})
    assert resp.status == 200 and (await resp.json())["job_id"] == "legacy-job-1"
    assert await bus.request_backlog() == 0


# --- GET ------------------------------------------------------------------------------------------
async def test_get_unknown_job_is_404(bus: MessageBus, view_store: JobViewStore, serve: Serve) -> None:
    client = await serve(bus, view_store)
    for job_id in ("0" * 32, "no.such.job", "x" * 100):
        resp = await client.get(f"/train/{job_id}")
        assert resp.status == 404
        assert await resp.json() == {"error": f"job {job_id} not found"}
    resp = await client.get("/nowhere")
    assert resp.status == 404 and "error" in await resp.json()
    resp = await client.delete("/train")
    assert resp.status == 405 and "POST" in resp.headers["Allow"]


async def test_list_pages_newest_first_and_filters(bus: MessageBus, view_store: JobViewStore, serve: Serve) -> None:
    client = await serve(bus, view_store)
    # Seeded a second apart: nx-27017 compares datetimes at whole seconds in queries (sorting
    # is exact), so cursors over jobs submitted within one second misbehave there, not on
    # MongoDB. test_list_pages_within_one_second covers that case on the backends that can.
    t0 = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
    ids = []
    for i in range(4):
        job = TrainJob(request=TrainRequest(dataset_uri=f"s3://datasets/set-{i}/"), submitted_at=t0 + timedelta(seconds=i))
        await view_store.apply(StatusEvent.queued(job, source="/cdtrain/ingress/other"))
        ids.append(job.job_id)
    resp = await client.post("/train", json={"dataset_uri": "s3://datasets/newest/"})  # submitted now
    ids.append((await resp.json())["job_id"])
    for job_id in ids[:2]:
        await view_store.apply(event(job_id, 1, "running", epoch=0, epochs=2))

    seen = await _all_pages(client, limit=2)
    assert len(seen) == 3 and [j["job_id"] for page in seen for j in page] == ids[::-1]

    running = await (await client.get("/train", params={"status": "RUNNING"})).json()
    assert sorted(j["job_id"] for j in running["jobs"]) == sorted(ids[:2]) and running["next_cursor"] is None
    assert all(j["state"] == "running" for j in running["jobs"])
    queued = await (await client.get("/train?status=queued&limit=10")).json()
    assert [j["job_id"] for j in queued["jobs"]] == ids[2:][::-1]


async def test_list_pages_within_one_second(bus: MessageBus, serve: Serve) -> None:
    client = await serve(bus, InMemoryJobViewStore())
    ids = [(await (await client.post("/train", json={"dataset_uri": DATASET})).json())["job_id"] for _ in range(5)]
    pages = await _all_pages(client, limit=2)
    assert sorted(j["job_id"] for page in pages for j in page) == sorted(ids) and len(pages) == 3


async def _all_pages(client: TestClient, limit: int) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while len(pages) < 20:
        resp = await client.get("/train", params={"limit": limit, **({"cursor": cursor} if cursor else {})})
        assert resp.status == 200
        body = await resp.json()
        pages.append(body["jobs"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    return pages


@pytest.mark.parametrize(("query", "field"), [
    ("limit=0", "limit"), ("limit=5000", "limit"), ("limit=ten", "limit"),
    ("status=sleeping", "status"), ("cursor=not-a-cursor", "cursor"),
])
async def test_list_rejects_bad_parameters(query: str, field: str, view_store: JobViewStore, serve: Serve) -> None:
    client = await serve(InProcessBus(), view_store)
    resp = await client.get(f"/train?{query}")
    assert resp.status == 422
    assert (await resp.json())["field"] == field


# --- SSE ------------------------------------------------------------------------------------------
class SseReader:
    """Reads frames off a live text/event-stream response."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments = 0
        self.retry: str | None = None

    async def next(self, timeout: float = WAIT) -> dict[str, str] | None:
        """The next frame as {"event", "id", "data"}; None at the end of the stream."""
        frame: dict[str, str] = {}
        deadline = time.monotonic() + timeout  # for the frame, whatever pings arrive meanwhile
        while True:
            line = await asyncio.wait_for(self.resp.content.readline(), max(0.0, deadline - time.monotonic()))
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text == "":
                if "data" in frame:  # as EventSource: a block without data dispatches nothing
                    return frame
                self.retry = frame.get("retry", self.retry)
                frame = {}
                continue
            if text.startswith(":"):
                self.comments += 1
                continue
            name, _, value = text.partition(": ")
            frame[name] = frame[name] + "\n" + value if name == "data" and name in frame else value


async def test_sse_streams_events_in_order_and_ends(bus_factory: BusFactory, view_store: JobViewStore,
                                                    serve: Serve) -> None:
    ingress_bus, worker = await bus_factory(), await bus_factory()
    client = await serve(ingress_bus, view_store)
    job_id = (await (await client.post("/train", json={"dataset_uri": DATASET})).json())["job_id"]

    resp = await client.get(f"/train/{job_id}/events")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    sse = SseReader(resp)
    first = await sse.next()
    assert first is not None and first["event"] == "view" and first["id"] == "0"
    assert sse.retry == "3000"
    assert json.loads(first["data"])["state"] == "queued"

    # Published only now: the subscription exists before the first frame is sent.
    worker_events = [
        event(job_id, 1, "starting"),
        event(job_id, 2, "running", epoch=0, epochs=2, metrics={"f1": 0.5}),
        event(job_id, 2, "running", epoch=0, epochs=2, metrics={"f1": 0.5}),  # redelivered: skipped
        event(job_id, 3, "running", epoch=1, epochs=2, metrics={"f1": 0.7}),
        event(job_id, 4, "succeeded", epochs=2, metrics={"f1": 0.7}),
        event(job_id, 5, "running"),  # after the end: never sent
    ]
    for ev in worker_events:
        await worker.publish_status(ev, ev.routing_key)
    frames = []
    while (f := await sse.next()) is not None:
        frames.append(f)
    assert [(f["event"], f.get("id")) for f in frames] == [
        ("status", "1"), ("status", "2"), ("status", "3"), ("status", "4"), ("end", None)]
    assert [StatusEvent.model_validate_json(f["data"]).state for f in frames[:4]] == [
        JobState.STARTING, JobState.RUNNING, JobState.RUNNING, JobState.SUCCEEDED]
    assert json.loads(frames[-1]["data"]) == {"job_id": job_id, "state": "succeeded"}


async def test_sse_late_watcher_gets_the_final_view_and_end(bus: MessageBus, view_store: JobViewStore,
                                                            serve: Serve) -> None:
    client = await serve(bus, view_store)
    job_id = (await (await client.post("/train", json={"dataset_uri": DATASET})).json())["job_id"]
    await view_store.apply(event(job_id, 1, "failed", error="CUDA out of memory"))
    resp = await client.get(f"/train/{job_id}/events")
    sse = SseReader(resp)
    view = await sse.next()
    assert view is not None and view["event"] == "view" and json.loads(view["data"])["error"] == "CUDA out of memory"
    end = await sse.next()
    assert end is not None and end["event"] == "end" and json.loads(end["data"])["state"] == "failed"
    assert await sse.next() is None


async def test_sse_heartbeats_and_unknown_job(bus: MessageBus, view_store: JobViewStore, serve: Serve) -> None:
    client = await serve(bus, view_store)
    resp = await client.get("/train/" + "f" * 32 + "/events")
    assert resp.status == 404
    job_id = (await (await client.post("/train", json={"dataset_uri": DATASET})).json())["job_id"]
    resp = await client.get(f"/train/{job_id}/events")
    sse = SseReader(resp)
    await sse.next()
    with pytest.raises(TimeoutError):
        await sse.next(timeout=1.3)  # nothing happens to the job: only pings (every 0.5 s)
    assert sse.comments >= 2
    resp.close()


async def test_sse_client_going_away_releases_its_subscription(serve: Serve) -> None:
    bus = InProcessBus()
    client = await serve(bus, InMemoryJobViewStore())
    job_id = (await (await client.post("/train", json={"dataset_uri": DATASET})).json())["job_id"]
    resp = await client.get(f"/train/{job_id}/events")
    await SseReader(resp).next()
    assert len(bus.broker.watchers) == 1
    resp.close()  # the client disconnects; the server notices at its next ping (0.5 s)

    async def released() -> bool:
        return not bus.broker.watchers

    assert await eventually(released, timeout=5)


# --- auth -----------------------------------------------------------------------------------------
async def test_api_token_guards_train_routes(bus: MessageBus, serve: Serve) -> None:
    client = await serve(bus, InMemoryJobViewStore(), settings=make_settings(api_token=SecretStr("t0ken")))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dDBrZW4="}):
        resp = await client.post("/train", json={"dataset_uri": DATASET}, headers=headers)
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await client.get("/train", headers=headers)).status == 401
        assert (await client.get("/train/abc/events", headers=headers)).status == 401
    good = {"Authorization": "Bearer t0ken"}
    assert (await client.post("/train", json={"dataset_uri": DATASET}, headers=good)).status == 202
    assert (await client.get("/train", headers=good)).status == 200
    assert (await client.get("/readyz")).status == 200
    assert await bus.request_backlog() == 1


# --- settings and process wiring --------------------------------------------------------------------
def test_settings_from_env() -> None:
    env = {
        "CDTRAIN_PORT": "9000", "CDTRAIN_API_TOKEN": "abc", "CDTRAIN_BUS_URL": "amqp://u:p@rabbit:5672/",
        "CDTRAIN_MONGODB_URL": "mongodb://mongo:27017/cdtrain", "CDTRAIN_TRIGGER_PREFIX": "incoming/",
        "CDTRAIN_TRIGGER_BUCKETS": "a-bucket, b-bucket", "CDTRAIN_SQS_QUEUE_URL": "https://sqs/q",
        "CDTRAIN_SQS_WAIT_S": "5", "CDTRAIN_S3_ENDPOINT_URL": "http://minio:9000", "CDTRAIN_BUCKET_EVENTS_AMQP_URL": "amqp://x/",
        "HOSTNAME": "api-0", "UNRELATED": "ignored", "CDTRAIN_MONGODB_DATABASE": "",
    }
    s = IngressSettings.from_env(env)
    assert s.port == 9000 and s.api_token is not None and s.api_token.get_secret_value() == "abc"
    assert s.webhook_token is None and s.view_store_database is None  # empty means unset (tokens excepted)
    assert s.bus.url == "amqp://u:p@rabbit:5672/" and s.view_store_url.startswith("mongodb://")
    assert s.trigger.prefix == "incoming/" and s.trigger.buckets == {"a-bucket", "b-bucket"}
    assert s.sqs is not None and s.sqs.wait_time_s == 5 and s.s3.endpoint_url == "http://minio:9000"
    assert s.bucket_events_amqp is not None and s.bucket_events_amqp.exchange == "bucketevents"
    assert s.instance == "api-0" and "abc" not in repr(s)
    assert IngressSettings.from_env({}).bucket_events_amqp is None
    with pytest.raises(ValueError, match="CDTRAIN_PORT"):
        IngressSettings.from_env({"CDTRAIN_PORT": "eighty"})
    with pytest.raises(ValueError, match="CDTRAIN_SQS_QUEUE_URL"):
        IngressSettings.from_env({"CDTRAIN_SQS_REGION": "eu-west-1"})


async def test_run_ingress_on_real_services(amqp_url: str, mongodb_url: str, tmp_path: Path) -> None:
    """The process wiring end to end: RabbitMQ + MongoDB from settings, serve, stop cleanly."""
    topology = new_topology()
    database = f"cdtrain_test_{uuid.uuid4().hex[:12]}"
    settings = make_settings(
        host="127.0.0.1", port=0, bus=BusSettings(url=amqp_url), topology_prefix=topology.prefix,
        view_store_url=mongodb_url, view_store_database=database, local_objects_dir=tmp_path,
        sse_heartbeat_s=30.0)
    stop = asyncio.Event()
    started: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(run_ingress(settings, stop=stop, on_started=started.set_result))
    try:
        base = (await asyncio.wait_for(started, WAIT))[0]
        async with aiohttp.ClientSession() as http:
            assert (await http.get(f"{base}/readyz")).status == 200
            resp = await http.post(f"{base}/train", json={"dataset_uri": DATASET})
            assert resp.status == 202
            job_id = (await resp.json())["job_id"]
            assert (await (await http.get(f"{base}/train/{job_id}")).json())["state"] == "queued"
            # A graceful stop ends open SSE streams instead of waiting for them.
            stream = await http.get(f"{base}/train/{job_id}/events")
            sse = SseReader(stream)
            assert (await sse.next())["event"] == "view"  # type: ignore[index]
            t0 = time.monotonic()
            stop.set()
            assert await sse.next() is None
            await asyncio.wait_for(server, WAIT)
            assert time.monotonic() - t0 < 5
    finally:
        stop.set()
        await asyncio.gather(server, return_exceptions=True)
        store = MongoJobViewStore.connect(mongodb_url, database=database)
        await store.collection.database.client.drop_database(database)
        await store.close()
        await delete_topology(amqp_url, topology)
