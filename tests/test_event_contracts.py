"""The bus's contracts: status events as CloudEvents (structured mode, ``dataschema``, ``traceparent``)
read back from RabbitMQ with the CloudEvents SDK, the trace of a POST carried to a worker's events,
and the AsyncAPI document of the bus checked against the official AsyncAPI 3.0 JSON Schema."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aio_pika
import jsonschema_rs
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1.http import from_http

from infra.bus import BusSettings, InProcessBus, MessageBus
from infra.bus.rabbit import RabbitBus
from infra.contracts import write_asyncapi, write_status_data_schema
from infra.objects import LocalObjectStore
from infra.views import InMemoryJobViewStore
from ingress.app import create_app
from ingress.openapi import package_version
from ingress.settings import IngressSettings
from schemas.asyncapi import MESSAGE_MODELS, REF_TEMPLATE, build_asyncapi
from schemas.events import (
    CLOUDEVENTS_CONTENT_TYPE,
    STATUS_DATA_SCHEMA,
    STATUS_DATA_SCHEMA_PATH,
    StatusEvent,
    status_data_json_schema,
)
from schemas.jobs import JobState, TrainJob, TrainRequest
from schemas.topology import Topology, job_binding_key
from schemas.tracing import TraceParent, continue_trace
from tests.fixtures.rabbit import TEST_SETTINGS

ASYNCAPI_SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0-schema.json"
INCOMING = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TINY = {"base_channel": 4, "crop_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu", "compile": False,
        "amp": False, "epochs": 1}


# --- helpers ------------------------------------------------------------------------------------
class Tap:
    """A raw AMQP queue of the test's own on the status exchange: the messages as they are on the
    wire (content type, properties, body), read without the bus."""

    def __init__(self) -> None:
        self.messages: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.messages.append(message)

    def of_job(self, job_id: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        return [m for m in self.messages if (m.routing_key or "").startswith(f"job.{job_id}.")]


@asynccontextmanager
async def tap(amqp_url: str, exchange: str, binding_key: str = "job.#") -> AsyncIterator[Tap]:
    conn = await aio_pika.connect(amqp_url, timeout=5)
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, binding_key)
        taken = Tap()
        await queue.consume(taken.on_message, no_ack=True)
        yield taken
    finally:
        await conn.close()


async def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def rabbit_bus(amqp_url: str, topology: Topology) -> RabbitBus:
    return RabbitBus(BusSettings(url=amqp_url, **TEST_SETTINGS), topology)


@asynccontextmanager
async def ingress_client(bus: MessageBus, store: InMemoryJobViewStore, objects: Path) -> AsyncIterator[TestClient]:
    app = create_app(IngressSettings(instance="contracts"), bus, store, LocalObjectStore(objects))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


# --- status events read with the CloudEvents SDK, from the real broker ---------------------------
async def test_events_of_ingress_worker_and_watchdog_read_with_the_cloudevents_sdk(
        amqp_url: str, rabbit_topology: Topology, tmp_path: Path) -> None:
    """POST with a traceparent -> the ingress's QUEUED, a worker's STARTING and FAILED (a dataset
    that is not there: no training), then the watchdog's re-queue: every event is structured-mode
    CloudEvents that two SDK readers take as they come off RabbitMQ, with its dataschema, whose
    data the served schema accepts, in the trace of the POST; the re-queued request keeps it."""
    from mlflow import MlflowClient  # the worker brings torch: imported only by this test

    from consumer.stores import StoreResolver
    from consumer.tracking.job_tracker import MlflowJobTracker
    from consumer.watchdog import Watchdog
    from consumer.worker import TrainingWorker, WorkerSettings

    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    store = InMemoryJobViewStore()
    objects = tmp_path / "objects"
    (objects / "lake").mkdir(parents=True)
    bus = rabbit_bus(amqp_url, rabbit_topology)
    await bus.connect()
    tracker = MlflowJobTracker(MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "contracts",
                               artifact_location=(tmp_path / "artifacts").as_uri())
    worker = TrainingWorker(bus, StoreResolver(LocalObjectStore(objects)), tracker,
                            # No heartbeat within the job's second: the events are the job's own.
                            WorkerSettings(work_dir=tmp_path / "work", source="/cdtrain/worker/contracts",
                                           heartbeat_interval=60.0), views=store)
    try:
        async with tap(amqp_url, rabbit_topology.status_exchange.name) as wire, \
                ingress_client(bus, store, objects) as client:
            schema = jsonschema_rs.validator_for(await (await client.get(STATUS_DATA_SCHEMA_PATH)).json())
            resp = await client.post("/train", json={"dataset_uri": "s3://lake/missing/", "config": TINY},
                                     headers={"traceparent": INCOMING})
            assert resp.status == 202, await resp.text()
            job_id = (await resp.json())["job_id"]
            answered = TraceParent.parse(resp.headers["traceparent"])
            incoming = TraceParent.parse(INCOMING)
            assert answered is not None and incoming is not None
            assert answered.trace_id == incoming.trace_id and answered.parent_id != incoming.parent_id

            consuming = await bus.consume_requests(worker.handle, model=TrainJob, prefetch=1)
            try:
                await wait_for(lambda: any(m.routing_key.endswith(".failed") for m in wire.of_job(job_id)))
            finally:
                await consuming.close()
            # No projector runs: the view still says STARTING (the worker's claim), so the worker
            # looks silent to a watchdog that allows no silence at all, which re-queues the job.
            await asyncio.sleep(0.01)
            watchdog = Watchdog(bus, store, stale_after=0.0, step_stall=None, source="/cdtrain/watchdog/contracts")
            assert await watchdog.sweep() == [job_id]
            await wait_for(lambda: sum(m.routing_key.endswith(".queued") for m in wire.of_job(job_id)) == 2)
            requeued = await take_request(amqp_url, rabbit_topology)
            view = await store.get(job_id)
    finally:
        await worker.close()
        await bus.close()

    # The re-queued attempt continues the trace (from the span of the view's newest submission).
    assert view is not None and view.traceparent is not None
    assert requeued.job_id == job_id and requeued.traceparent == view.traceparent
    assert view.traceparent.split("-")[1] == incoming.trace_id
    seen: list[tuple[str, str, str]] = []
    spans: dict[str, set[str]] = {}
    for message in wire.of_job(job_id):
        assert message.content_type == CLOUDEVENTS_CONTENT_TYPE
        sdk_event = ce_rabbitmq.from_structured(
            ce_rabbitmq.RabbitMQMessage(headers={}, content_type=message.content_type, body=message.body),
            JSONFormat())
        attributes = sdk_event.get_attributes()
        data = sdk_event.get_data()
        legacy = from_http({"content-type": message.content_type}, message.body)  # the SDK's HTTP reader
        assert legacy["id"] == attributes["id"] and legacy.data == data

        state = message.routing_key.rsplit(".", 1)[1]
        assert attributes["specversion"] == "1.0"
        assert attributes["id"] == message.message_id
        assert attributes["type"] == f"io.cdtrain.job.{state}"
        assert attributes["subject"] == job_id == data["job_id"]
        assert started <= attributes["time"] <= datetime.now(timezone.utc)
        assert attributes["dataschema"] == STATUS_DATA_SCHEMA
        assert attributes["datacontenttype"] == "application/json"
        assert data["state"] == state
        schema.validate(data)
        span = TraceParent.parse(attributes["traceparent"])
        assert span is not None and span.trace_id == incoming.trace_id
        spans.setdefault(attributes["source"], set()).add(span.parent_id)
        seen.append((attributes["source"], state, attributes["traceparent"]))

    assert [(source, state) for source, state, _ in seen] == [
        ("/cdtrain/ingress/contracts", "queued"),
        ("/cdtrain/worker/contracts", "starting"),
        ("/cdtrain/worker/contracts", "failed"),
        ("/cdtrain/watchdog/contracts", "queued"),
    ]
    assert seen[0][2] == str(answered)  # the QUEUED carries the span the 202 named
    # The worker's attempt is one span of its own, and the watchdog's another.
    assert len(spans["/cdtrain/worker/contracts"]) == 1
    assert len(set().union(*spans.values())) == 3


async def take_request(amqp_url: str, topology: Topology) -> TrainJob:
    conn = await aio_pika.connect(amqp_url, timeout=5)
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(topology.requests_queue.name, passive=True)
        message = await queue.get(timeout=5)
        await message.ack()
        assert message.content_type == "application/json"
        return TrainJob.model_validate_json(message.body)
    finally:
        await conn.close()


async def test_events_published_the_old_way_are_still_read(amqp_url: str, rabbit_topology: Topology) -> None:
    """Rolling upgrade: an event an older producer sent as application/json (nulls written out, no
    dataschema, no traceparent) reaches the projector queue and a watcher as the same event."""
    event = StatusEvent.for_job("old-producer-job", 3, JobState.RUNNING, source="/cdtrain/worker/old", epoch=1,
                                metrics={"f1": 0.5})
    old_body = json.loads(event.model_dump_json())
    del old_body["dataschema"], old_body["traceparent"]
    assert old_body["data"]["phase"] is None
    bus = rabbit_bus(amqp_url, rabbit_topology)
    await bus.connect()
    projected: list[StatusEvent] = []
    watched: list[StatusEvent] = []

    async def project(got: StatusEvent, _delivery: Any) -> None:
        projected.append(got)

    async def watch(got: StatusEvent, _delivery: Any) -> None:
        watched.append(got)

    try:
        async with await bus.subscribe_status(job_binding_key(event.job_id), watch, model=StatusEvent):
            conn = await aio_pika.connect(amqp_url, timeout=5)
            try:
                channel = await conn.channel()
                exchange = await channel.get_exchange(rabbit_topology.status_exchange.name, ensure=False)
                await exchange.publish(aio_pika.Message(json.dumps(old_body).encode(), content_type="application/json",
                                                        message_id=event.id), event.routing_key)
            finally:
                await conn.close()
            async with await bus.consume_projector(project, model=StatusEvent):
                await wait_for(lambda: projected and watched, timeout=10)
    finally:
        await bus.close()
    for got in (projected[0], watched[0]):
        assert got.id == event.id and got.data == event.data and got.time == event.time
        assert got.traceparent is None and got.dataschema == STATUS_DATA_SCHEMA  # version 1's data


async def test_only_status_events_are_cloudevents_on_the_wire(amqp_url: str, rabbit_topology: Topology) -> None:
    """The codec decides: a status event is structured mode whoever publishes it; a request is JSON."""
    bus = rabbit_bus(amqp_url, rabbit_topology)
    await bus.connect()
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/x/"), traceparent=INCOMING)
    event = StatusEvent.queued(job, source="/cdtrain/test")
    try:
        async with tap(amqp_url, rabbit_topology.status_exchange.name) as wire:
            await bus.publish_status(event, event.routing_key, message_id=event.id)
            await bus.publish_request(job, message_id=job.job_id)
            await wait_for(lambda: wire.messages, timeout=10)
        requested = await take_request(amqp_url, rabbit_topology)  # asserts application/json
    finally:
        await bus.close()
    (message,) = wire.messages
    assert message.content_type == CLOUDEVENTS_CONTENT_TYPE
    body = json.loads(message.body)
    assert body["traceparent"] == INCOMING and body["dataschema"] == STATUS_DATA_SCHEMA
    assert None not in body.values() and None not in body["data"].values()  # no null attributes
    assert requested.traceparent == INCOMING


# --- traceparent ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("header", "valid"), [
    (INCOMING, True),
    (INCOMING.upper(), False),                                          # lower-case hex only
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),  # all-zero trace id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),  # all-zero parent id
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),  # version ff is invalid
    (INCOMING + "-extra", False),                                       # version 00 is exactly 55 characters
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later", True),  # a later version, read forward
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", False),   # short trace id
    ("", False), (None, False),
])
def test_traceparent_parsing(header: str | None, valid: bool) -> None:
    parsed = TraceParent.parse(header)
    assert (parsed is not None) is valid
    if parsed is not None:
        assert str(parsed) == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        assert parsed.sampled


def test_a_child_span_keeps_the_trace_and_a_bad_header_starts_one() -> None:
    parent = TraceParent.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
    assert parent is not None and not parent.sampled
    child = continue_trace(str(parent))
    assert (child.trace_id, child.flags) == (parent.trace_id, parent.flags) and child.parent_id != parent.parent_id
    fresh = continue_trace("not a traceparent")
    assert TraceParent.parse(str(fresh)) == fresh and fresh.trace_id != parent.trace_id and fresh.sampled
    assert continue_trace(None).trace_id != fresh.trace_id


def test_a_broken_trace_context_never_makes_a_message_invalid() -> None:
    """Tolerant reader: a job or event with a bad traceparent is read without it (not dead-lettered)."""
    job = TrainJob.model_validate({"request": {"dataset_uri": "s3://lake/x/"}, "traceparent": "00-zz"})
    assert job.traceparent is None
    body = json.loads(StatusEvent.for_job("job-1", 1, "starting", source="/t", traceparent=INCOMING).to_json_bytes())
    assert StatusEvent.model_validate(body).traceparent == INCOMING
    assert StatusEvent.model_validate({**body, "traceparent": 42}).traceparent is None


async def test_post_answers_the_trace_it_started_or_continued(tmp_path: Path) -> None:
    bus = InProcessBus(topology=Topology(prefix="trace-test"))
    await bus.connect()
    store = InMemoryJobViewStore()
    try:
        async with ingress_client(bus, store, tmp_path / "objects") as client:
            body = {"dataset_uri": "s3://lake/x/"}
            for headers in ({}, {"traceparent": "00-bad"}):
                resp = await client.post("/train", json=body, headers=headers)
                assert resp.status == 202
                started = TraceParent.parse(resp.headers["traceparent"])
                assert started is not None and started.trace_id != TraceParent.parse(INCOMING).trace_id
                view = await store.get((await resp.json())["job_id"])
                assert view is not None and view.traceparent == str(started)  # the watchdog's source
            keyed = {**body, "idempotency_key": "trace-dup"}
            first = await client.post("/train", json=keyed, headers={"traceparent": INCOMING})
            again = await client.post("/train", json=keyed)
            assert (first.status, again.status) == (202, 200)
            assert again.headers["traceparent"] == first.headers["traceparent"]  # the job's trace
            assert first.headers["traceparent"].split("-")[1] == INCOMING.split("-")[1]
    finally:
        await bus.close()


# --- AsyncAPI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asyncapi_validator() -> Any:
    return jsonschema_rs.validator_for(json.loads(ASYNCAPI_SCHEMA.read_text()))


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_asyncapi_document_is_valid_asyncapi_3(asyncapi_validator: Any) -> None:
    document = build_asyncapi(Topology(prefix="doc-test"), version="1.2.3")
    errors = [f"{e.instance_path}: {e}" for e in asyncapi_validator.iter_errors(document)]
    assert errors == []
    refs = [node["$ref"] for node in walk(document) if isinstance(node, dict) and "$ref" in node]
    assert len(refs) > 20
    for ref in refs:
        resolve(document, ref)  # every reference points inside the document


@pytest.mark.parametrize("breakage", ["no info", "exchange type", "operation action", "binding field"])
def test_asyncapi_validation_can_fail(breakage: str, asyncapi_validator: Any) -> None:
    document = build_asyncapi()
    if breakage == "no info":
        del document["info"]
    elif breakage == "exchange type":
        document["channels"]["statusEvent"]["bindings"]["amqp"]["exchange"]["type"] = "broadcast"
    elif breakage == "operation action":
        document["operations"]["sendStatusEvent"]["action"] = "publish"  # AsyncAPI 2's word
    else:
        document["operations"]["sendTrainJob"]["bindings"]["amqp"]["persistent"] = True
    assert not asyncapi_validator.is_valid(document)


def test_asyncapi_names_every_exchange_and_queue_of_the_topology() -> None:
    topology = Topology(prefix="names-test", delivery_limit=7)
    document = build_asyncapi(topology)
    exchanges, queues = {}, {}
    for channel in document["channels"].values():
        amqp = channel["bindings"]["amqp"]
        if amqp["is"] == "routingKey":
            exchanges[amqp["exchange"]["name"]] = amqp["exchange"]
        else:
            queues[amqp["queue"]["name"]] = amqp
    for spec in topology.exchanges():
        assert exchanges[spec.name]["type"] == spec.type.value and exchanges[spec.name]["durable"] is spec.durable
    for spec in topology.queues():
        assert queues[spec.name]["x-arguments"] == spec.arguments
        assert queues[spec.name]["x-bound-to"] == [{"exchange": b.exchange, "routingKey": b.routing_key}
                                                  for b in spec.bindings]
    assert queues["names-test.train-requests"]["x-arguments"]["x-delivery-limit"] == 7
    # The per-subscriber queues, by their name templates.
    assert queues["names-test.watch.{watcherId}"]["queue"]["exclusive"] is True
    assert queues["names-test.control.{workerId}"]["x-bound-to"] == [
        {"exchange": "names-test.control", "routingKey": "cancel.*"}]
    assert set(exchanges) == {spec.name for spec in topology.exchanges()}
    assert set(queues) == {spec.name for spec in topology.queues()} | {
        "names-test.watch.{watcherId}", "names-test.control.{workerId}"}


def test_asyncapi_payloads_are_the_models_json_schemas() -> None:
    document = build_asyncapi()
    components = document["components"]["schemas"]
    prefix = REF_TEMPLATE.removesuffix("{model}")
    assert set(MESSAGE_MODELS) == set(document["components"]["messages"]) == {"trainJob", "statusEvent",
                                                                              "cancelCommand"}
    for name, (model, content_type, _) in MESSAGE_MODELS.items():
        message = document["components"]["messages"][name]
        assert message["contentType"] == content_type
        assert message["payload"] == {"$ref": prefix + model.__name__}
        schema = model.model_json_schema(mode="serialization")
        for def_name, definition in schema.pop("$defs", {}).items():
            assert components[def_name] == rewrite_refs(definition), def_name
        assert components[model.__name__] == rewrite_refs(schema)
    assert document["components"]["messages"]["statusEvent"]["contentType"] == CLOUDEVENTS_CONTENT_TYPE
    assert components["StatusEvent"]["properties"]["dataschema"]["default"] == STATUS_DATA_SCHEMA
    assert "traceparent" in components["TrainJob"]["properties"]


async def test_ingress_serves_the_documents_and_they_can_be_written(tmp_path: Path) -> None:
    topology = Topology(prefix=f"served-{uuid.uuid4().hex[:6]}")
    bus = InProcessBus(topology=topology)
    await bus.connect()
    try:
        async with ingress_client(bus, InMemoryJobViewStore(), tmp_path / "objects") as client:
            asyncapi = await client.get("/asyncapi.json")
            assert asyncapi.status == 200 and asyncapi.content_type == "application/json"
            assert await asyncapi.json() == build_asyncapi(topology, version=package_version())
            data_schema = await client.get(STATUS_DATA_SCHEMA_PATH)
            assert data_schema.status == 200
            served = await data_schema.json()
    finally:
        await bus.close()
    assert served == status_data_json_schema() and served["$id"] == STATUS_DATA_SCHEMA
    validator = jsonschema_rs.validator_for(served)
    event = StatusEvent.for_job("job-1", 2, "running", source="/t", epoch=0, metrics={"f1": 0.25})
    assert validator.is_valid(json.loads(event.to_json_bytes())["data"])
    assert not validator.is_valid({"job_id": "job-1", "sequence": -1, "state": "running"})

    written = write_asyncapi(tmp_path / "out" / "asyncapi.json", topology, version="9.9.9")
    assert json.loads(written.read_text()) == build_asyncapi(topology, version="9.9.9")
    assert json.loads(write_status_data_schema(tmp_path / "out" / "data.json").read_text()) == served


def walk(node: Any) -> Any:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def rewrite_refs(schema: Any) -> Any:
    """A model's own schema (refs to ``#/$defs/X``) as the document writes it."""
    return json.loads(json.dumps(schema).replace('"#/$defs/', '"' + REF_TEMPLATE.removesuffix("{model}")))
