"""Bucket events -> jobs: the trigger rule, the webhook, the AMQP listener, the SQS poller.

Each scenario runs on two stacks (``stack``): ``embedded`` (in-process bus, in-memory views,
local object store) and ``real`` (RabbitMQ, MongoDB via nx-27017, moto's S3 server). The AMQP
listener always consumes from the real RabbitMQ and the SQS poller always polls moto's SQS:
those are the services they exist for.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aio_pika
import aioboto3
import pytest
from aiobotocore.config import AioConfig
from pydantic import SecretStr

from infra.bus import MessageBus
from infra.objects import LocalObjectStore, ObjectStore, S3ObjectStore, S3Settings
from infra.views import InMemoryJobViewStore, JobViewStore
from ingress.amqp_listener import AmqpBucketListener
from ingress.bucket_events import BucketEventHandler
from ingress.settings import AmqpListenerSettings, SqsSettings, TriggerSettings
from ingress.sqs_poller import SqsBucketPoller
from ingress.submit import Submitter, ViewReader
from ingress.trigger import Ignored, Match, classify, decide, idempotency_key
from schemas.bucket_events import ObjectCreated
from schemas.jobs import JobState, new_job_id
from tests.test_ingress import WAIT, FlakyBus, Serve, eventually, make_settings
from tests.test_ingress import serve  # noqa: F401 - the fixture, shared with the HTTP tests

RULE = TriggerSettings()
ETAG = "5eb63bbbe01eeed093cb22bb8f5acdc3"


# --- stacks: the conftest fixtures, paired instead of crossed ------------------------------------
@pytest.fixture(params=["embedded", "real"])
def stack(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def bus_kind(stack: str) -> str:  # overrides tests/fixtures/rabbit.py's parametrized one
    return "inprocess" if stack == "embedded" else "rabbitmq"


@pytest.fixture
def view_store(stack: str, request: pytest.FixtureRequest) -> JobViewStore:
    if stack == "real":
        return request.getfixturevalue("mongo_view_store")
    return InMemoryJobViewStore()


@pytest.fixture
def object_store(stack: str, request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if stack == "real":
        return request.getfixturevalue("s3_store")
    return LocalObjectStore(tmp_path / "objects")


def created(key: str, *, bucket: str = "lake", etag: str | None = ETAG, version_id: str | None = None) -> ObjectCreated:
    return ObjectCreated(bucket=bucket, key=key, etag=etag, version_id=version_id, source="aws")


def minio_event(bucket: str, key: str, etag: str = ETAG, name: str = "s3:ObjectCreated:Put") -> dict[str, Any]:
    """What MinIO's webhook and AMQP targets send (key URL-encoded in the record)."""
    return {
        "EventName": name,
        "Key": f"{bucket}/{key}",
        "Records": [{
            "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
            "eventTime": "2026-11-27T12:00:00.716Z", "eventName": name,
            "userIdentity": {"principalId": "minioadmin"},
            "s3": {
                "s3SchemaVersion": "1.0", "configurationId": "Config",
                "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"},
                           "arn": f"arn:aws:s3:::{bucket}"},
                "object": {"key": quote_plus(key), "size": 1024, "eTag": f'"{etag}"',
                           "contentType": "application/zip", "sequencer": "17CB9B6B5D6B1B5E"},
            },
            "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64)"},
        }],
    }


# --- the rule, pure -------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "kind", "dataset_uri"), [
    ("datasets/levir.zip", "archive", "s3://lake/datasets/levir.zip"),
    ("datasets/2026/levir cd.tar.gz", "archive", "s3://lake/datasets/2026/levir cd.tar.gz"),
    ("datasets/levir.TGZ", "archive", "s3://lake/datasets/levir.TGZ"),
    ("datasets/levir/_READY", "marker", "s3://lake/datasets/levir/"),
    ("datasets/_READY", "marker", "s3://lake/datasets/"),
])
def test_rule_matches_archives_and_markers(key: str, kind: str, dataset_uri: str) -> None:
    found = classify(created(key), RULE)
    assert isinstance(found, Match) and (found.kind, found.dataset_uri) == (kind, dataset_uri)


@pytest.mark.parametrize(("key", "reason"), [
    ("other/levir.zip", "outside the trigger prefix 'datasets/'"),
    ("datasets/levir/A/0001.png", "neither a dataset archive"),
    ("datasets/levir/train_config.yaml", "neither a dataset archive"),
    ("datasets/levir.tar", "neither a dataset archive"),
    ("datasets/levir/_READY.txt", "neither a dataset archive"),
    ("datasets/levir/", "folder placeholder"),
    ("Datasets/levir.zip", "outside the trigger prefix"),
])
def test_rule_ignores_everything_else_with_a_reason(key: str, reason: str) -> None:
    found = classify(created(key), RULE)
    assert isinstance(found, Ignored) and reason in found.reason


def test_rule_settings_change_prefix_buckets_and_marker() -> None:
    rule = TriggerSettings(prefix="", buckets=frozenset({"lake"}), marker_name="DONE")
    assert isinstance(classify(created("x/DONE"), rule), Match)
    assert isinstance(classify(created("x/_READY"), rule), Ignored)
    found = classify(created("x.zip", bucket="elsewhere"), rule)
    assert isinstance(found, Ignored) and "not one of the trigger buckets" in found.reason


def test_idempotency_key_is_one_per_object_version() -> None:
    a = idempotency_key(created("datasets/a.zip"))
    assert a == idempotency_key(created("datasets/a.zip")) and a.startswith("bucket:s3://lake/datasets/a.zip#")
    assert a != idempotency_key(created("datasets/a.zip", etag="0" * 32))  # new content, new job
    v1 = idempotency_key(created("datasets/a.zip", version_id="v1"))
    assert v1 != idempotency_key(created("datasets/a.zip", version_id="v2"))
    long_key = idempotency_key(created("datasets/" + "x" * 900 + ".zip"))  # S3 keys reach 1,024 bytes
    assert len(long_key) <= 256 and long_key.startswith("bucket:sha256:")


# --- the rule with its object-store lookup ----------------------------------------------------------
async def test_config_beside_the_dataset_becomes_config_uri(object_store: ObjectStore, store_bucket: str) -> None:
    await object_store.put_bytes(store_bucket, "datasets/levir/train_config.yaml", b"epochs: 2\n")
    marker = await decide(created("datasets/levir/_READY", bucket=store_bucket), RULE, object_store)
    assert marker.request is not None
    assert marker.request.dataset_uri == f"s3://{store_bucket}/datasets/levir/"
    assert marker.request.config_uri == f"s3://{store_bucket}/datasets/levir/train_config.yaml"
    assert marker.request.register_model is True and marker.request.idempotency_key is not None

    rule = TriggerSettings(default_config_uri="s3://configs/default.yaml")
    archive = await decide(created("datasets/other.zip", bucket=store_bucket), rule, object_store)
    assert archive.request is not None and archive.request.config_uri == "s3://configs/default.yaml"
    plain = await decide(created("datasets/other.zip", bucket=store_bucket), RULE, object_store)
    assert plain.request is not None and plain.request.config_uri is None
    ignored = await decide(created("elsewhere/x.zip", bucket=store_bucket), RULE, object_store)
    assert ignored.request is None and "outside" in ignored.reason


# --- webhook ----------------------------------------------------------------------------------------
async def test_webhook_head_auth_and_trigger(bus: MessageBus, view_store: JobViewStore, object_store: ObjectStore,
                                             store_bucket: str, serve: Serve) -> None:
    settings = make_settings(webhook_token=SecretStr("hook-secret"))
    client = await serve(bus, view_store, settings=settings, object_store=object_store)
    assert (await client.head("/events/s3")).status == 200  # MinIO's probe carries no body
    payload = minio_event(store_bucket, "datasets/levir.zip")
    assert (await client.post("/events/s3", json=payload)).status == 401
    assert (await client.post("/events/s3", json=payload, headers={"Authorization": "Bearer nope"})).status == 401
    auth = {"Authorization": "Bearer hook-secret"}

    await object_store.put_bytes(store_bucket, "datasets/train_config.yaml", b"epochs: 1\n")
    resp = await client.post("/events/s3", json=payload, headers=auth)
    assert resp.status == 200, await resp.text()
    [result] = (await resp.json())["results"]
    assert result["action"] == "started" and result["reason"] == "dataset archive"
    assert result["dataset_uri"] == f"s3://{store_bucket}/datasets/levir.zip"
    assert result["config_uri"] == f"s3://{store_bucket}/datasets/train_config.yaml"
    job_id = result["job_id"]
    assert job_id == new_job_id(idempotency_key(created("datasets/levir.zip", bucket=store_bucket)))

    view = await view_store.get(job_id)
    assert view is not None and view.state is JobState.QUEUED and view.source == "bucket"
    assert view.trigger is not None and (view.trigger.bucket, view.trigger.key, view.trigger.etag) == (
        store_bucket, "datasets/levir.zip", ETAG)
    assert view.request is not None and view.request.register_model is True
    assert await bus.request_backlog() == 1

    # Redelivered: the same object version answers with the same job, and nothing is published.
    resp = await client.post("/events/s3", json=payload, headers=auth)
    [again] = (await resp.json())["results"]
    assert (again["action"], again["job_id"]) == ("duplicate", job_id)
    assert await bus.request_backlog() == 1


async def test_webhook_dedups_multipart_and_concurrent_deliveries(
        bus: MessageBus, view_store: JobViewStore, object_store: ObjectStore, store_bucket: str,
        serve: Serve) -> None:
    client = await serve(bus, view_store, object_store=object_store)
    put = minio_event(store_bucket, "datasets/big.tar.gz")
    complete = minio_event(store_bucket, "datasets/big.tar.gz", name="s3:ObjectCreated:CompleteMultipartUpload")
    # Both announcements of one multipart upload in one delivery (moto does this) ...
    both = {"Records": put["Records"] + complete["Records"]}
    resp = await client.post("/events/s3", json=both)
    assert [r["action"] for r in (await resp.json())["results"]] == ["started", "duplicate"]
    # ... and the same event from several deliveries at once (two targets, a retry storm).
    other = minio_event(store_bucket, "datasets/set/_READY", etag="d41d8cd98f00b204e9800998ecf8427e")
    answers = await asyncio.gather(*(client.post("/events/s3", json=other) for _ in range(6)))
    actions = sorted([(await a.json())["results"][0]["action"] for a in answers])
    assert actions == ["duplicate"] * 5 + ["started"]
    assert await bus.request_backlog() == 2

    # A new version of the object (new ETag) is new data: a new job.
    resp = await client.post("/events/s3", json=minio_event(store_bucket, "datasets/big.tar.gz", etag="1" * 32))
    assert (await resp.json())["results"][0]["action"] == "started"
    assert await bus.request_backlog() == 3


async def test_two_ingress_replicas_start_one_job_per_object(
        bus_factory: Any, view_store: JobViewStore, object_store: ObjectStore, store_bucket: str,
        serve: Serve) -> None:
    """The same bucket event delivered to two replicas at once, for 30 objects: each replica has
    its own bus connection and its own in-process lock, so only the view's creation (rule 10 of
    infra/views/merge.py) can keep them from starting an object twice."""
    replicas = [await serve(await bus_factory(), view_store, object_store=object_store) for _ in range(2)]
    events = [minio_event(store_bucket, f"datasets/set-{i:02d}/_READY", etag=f"{i:032x}") for i in range(30)]
    answers = await asyncio.gather(*(replica.post("/events/s3", json=e) for e in events for replica in replicas))
    actions = [(await a.json())["results"][0]["action"] for a in answers]
    per_object = [sorted(actions[2 * i: 2 * i + 2]) for i in range(30)]
    assert per_object == [["duplicate", "started"]] * 30
    bus = await bus_factory()
    assert await bus.request_backlog() == 30  # one request per object


async def test_webhook_ignores_and_rejects(bus: MessageBus, view_store: JobViewStore, object_store: ObjectStore,
                                           store_bucket: str, serve: Serve) -> None:
    client = await serve(bus, view_store, object_store=object_store)
    resp = await client.post("/events/s3", json=minio_event(store_bucket, "datasets/levir/A/0001.png"))
    [result] = (await resp.json())["results"]
    assert result["action"] == "ignored" and "neither a dataset archive" in result["reason"] and result["job_id"] is None
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": store_bucket}
    assert (await (await client.post("/events/s3", json=test_event)).json()) == {"results": []}
    assert (await client.post("/events/s3", data=b"{oops")).status == 400
    resp = await client.post("/events/s3", json={"hello": "world"})
    assert resp.status == 422 and "not a bucket notification" in (await resp.json())["error"]
    assert await bus.request_backlog() == 0


async def test_webhook_bus_down_is_503_then_the_retry_starts_the_job(
        bus: MessageBus, view_store: JobViewStore, object_store: ObjectStore, store_bucket: str,
        serve: Serve) -> None:
    client = await serve(FlakyBus(bus, fail_requests=1), view_store, object_store=object_store)
    payload = minio_event(store_bucket, "datasets/levir.zip")
    resp = await client.post("/events/s3", json=payload)
    assert resp.status == 503 and "Retry-After" in resp.headers  # MinIO keeps it and retries
    resp = await client.post("/events/s3", json=payload)
    assert (await resp.json())["results"][0]["action"] == "started"
    assert await bus.request_backlog() == 1


# --- AMQP listener (MinIO's AMQP target) --------------------------------------------------------------
@pytest.fixture
async def amqp_source(amqp_url: str) -> AsyncIterator[AmqpListenerSettings]:
    """A MinIO-style exchange and our queue, unique to the test, deleted after it."""
    tag = uuid.uuid4().hex[:10]
    settings = AmqpListenerSettings(url=amqp_url, exchange=f"test-bucketevents-{tag}",
                                    queue=f"test-bucket-events-{tag}", retry_delay_s=0.1)
    yield settings
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        async with conn.channel() as ch:
            await ch.queue_delete(settings.queue)
        async with conn.channel() as ch:
            await ch.exchange_delete(settings.exchange)


def handler_for(bus: MessageBus, view_store: JobViewStore, object_store: ObjectStore,
                rule: TriggerSettings = RULE) -> BucketEventHandler:
    views = ViewReader(view_store, timeout_s=3.0, retry_after_s=0.1)
    return BucketEventHandler(rule, object_store, Submitter(bus, views, event_source="/cdtrain/ingress/test"),
                              retry_after_s=0.1)


async def publish_like_minio(settings: AmqpListenerSettings, body: bytes) -> None:
    conn = await aio_pika.connect(settings.url)
    async with conn:
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(settings.exchange, aio_pika.ExchangeType(settings.exchange_type),
                                                  durable=True)
        await exchange.publish(aio_pika.Message(body, content_type="application/json",
                                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                               routing_key=settings.routing_key)


async def test_amqp_listener_starts_one_job_per_object_version(
        amqp_source: AmqpListenerSettings, bus: MessageBus, view_store: JobViewStore,
        object_store: ObjectStore, store_bucket: str) -> None:
    flaky = FlakyBus(bus, fail_requests=1)  # the first try finds the bus down: requeued, retried
    listener = AmqpBucketListener(amqp_source, handler_for(flaky, view_store, object_store))
    await listener.start()
    try:
        body = json.dumps(minio_event(store_bucket, "datasets/levir/_READY")).encode()
        await publish_like_minio(amqp_source, body)
        job_id = new_job_id(idempotency_key(created("datasets/levir/_READY", bucket=store_bucket)))

        async def queued() -> bool:
            view = await view_store.get(job_id)
            return view is not None and view.state is JobState.QUEUED

        assert await eventually(queued)
        view = await view_store.get(job_id)
        assert view is not None and view.source == "bucket"
        assert view.request is not None and view.request.dataset_uri == f"s3://{store_bucket}/datasets/levir/"

        await publish_like_minio(amqp_source, body)  # redelivered notification
        await publish_like_minio(amqp_source, b"not json at all")  # poison: dropped, not retried

        async def settled() -> bool:
            # The first message twice (requeued, then acked), its duplicate, the poison.
            return listener.handled >= 4

        assert await eventually(settled)
        assert await bus.request_backlog() == 1
        assert flaky.fail_requests == 0
    finally:
        await listener.close()
    # Nothing left behind: every message was acked or rejected.
    conn = await aio_pika.connect(amqp_source.url)
    async with conn:
        queue = await (await conn.channel()).declare_queue(amqp_source.queue, passive=True)
        assert queue.declaration_result.message_count == 0


# --- SQS poller (AWS S3 -> SQS, on moto) -------------------------------------------------------------------
@pytest.fixture
async def sqs_bucket(s3_settings: S3Settings, s3_bucket: str) -> AsyncIterator[tuple[Any, Any, str, str]]:
    """(sqs client, s3 client, queue url, bucket): the bucket notifies the queue of ObjectCreated
    under datasets/, as an AWS bucket would be configured (docs/api.md)."""
    session = aioboto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    config = AioConfig(s3={"addressing_style": "path"})
    async with session.client("sqs", endpoint_url=s3_settings.endpoint_url) as sqs, \
            session.client("s3", endpoint_url=s3_settings.endpoint_url, config=config) as s3:
        queue_url = (await sqs.create_queue(QueueName=f"events-{uuid.uuid4().hex[:12]}"))["QueueUrl"]
        arn = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
        await s3.put_bucket_notification_configuration(Bucket=s3_bucket, NotificationConfiguration={
            "QueueConfigurations": [{
                "QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
                "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "datasets/"}]}},
            }]})
        yield sqs, s3, queue_url, s3_bucket
        await sqs.delete_queue(QueueUrl=queue_url)


async def poll_until(poller: SqsBucketPoller, done: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await done():
        assert time.monotonic() < deadline, "the poller did not get there in time"
        await poller.poll_once()


async def test_sqs_poller_starts_jobs_from_real_s3_notifications(
        sqs_bucket: tuple[Any, Any, str, str], s3_store: S3ObjectStore, bus: MessageBus,
        view_store: JobViewStore) -> None:
    sqs, s3, queue_url, bucket = sqs_bucket
    settings = SqsSettings(queue_url=queue_url, wait_time_s=1, retry_visibility_s=0)
    flaky = FlakyBus(bus, fail_requests=1)  # first try fails: the message must come back
    poller = SqsBucketPoller(sqs, settings, handler_for(flaky, view_store, s3_store))

    await s3.put_object(Bucket=bucket, Key="datasets/levir cd/train_config.yaml", Body=b"epochs: 2\n")
    await s3.put_object(Bucket=bucket, Key="datasets/levir cd/levir.zip", Body=b"PK\x05\x06" + b"\0" * 18)
    await s3.put_object(Bucket=bucket, Key="elsewhere/x.zip", Body=b"no notification: filtered by S3")
    archive = created("datasets/levir cd/levir.zip", bucket=bucket,
                      etag=(await s3_store.head(bucket, "datasets/levir cd/levir.zip")).etag)  # type: ignore[union-attr]
    job_id = new_job_id(idempotency_key(archive))

    async def started() -> bool:
        return await view_store.get(job_id) is not None

    await poll_until(poller, started)
    view = await view_store.get(job_id)
    assert view is not None and view.source == "bucket" and view.trigger is not None
    assert view.trigger.key == "datasets/levir cd/levir.zip"  # URL-decoded from moto's event
    assert view.request is not None
    assert view.request.config_uri == f"s3://{bucket}/datasets/levir cd/train_config.yaml"

    # A multipart upload: moto announces it twice (Put + CompleteMultipartUpload): one job.
    upload = await s3.create_multipart_upload(Bucket=bucket, Key="datasets/big.tar.gz")
    parts = []
    for number, chunk in enumerate([b"a" * (5 * 1024 * 1024), b"b" * 10], start=1):
        part = await s3.upload_part(Bucket=bucket, Key="datasets/big.tar.gz", PartNumber=number,
                                    UploadId=upload["UploadId"], Body=chunk)
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
    await s3.complete_multipart_upload(Bucket=bucket, Key="datasets/big.tar.gz", UploadId=upload["UploadId"],
                                       MultipartUpload={"Parts": parts})

    async def drained() -> bool:
        attrs = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
        return sum(int(v) for v in attrs["Attributes"].values()) == 0

    await poll_until(poller, drained)
    jobs, _ = await view_store.list(limit=10)
    assert sorted(v.trigger.key for v in jobs if v.trigger) == ["datasets/big.tar.gz", "datasets/levir cd/levir.zip"]
    assert await bus.request_backlog() == 2
    # Deleted after handling: the test event, the config (ignored), the archive, both multipart events.
    assert poller.handled == 5 and flaky.fail_requests == 0


async def test_sqs_poller_runs_in_the_background_and_stops(
        sqs_bucket: tuple[Any, Any, str, str], s3_store: S3ObjectStore, bus: MessageBus,
        view_store: JobViewStore) -> None:
    sqs, s3, queue_url, bucket = sqs_bucket
    poller = SqsBucketPoller(sqs, SqsSettings(queue_url=queue_url, wait_time_s=1), handler_for(bus, view_store, s3_store))
    poller.start()
    try:
        await s3.put_object(Bucket=bucket, Key="datasets/tiles/_READY", Body=b"2026-11-27T12:00Z")

        async def started() -> bool:
            jobs, _ = await view_store.list(limit=5)
            return any(v.request and v.request.dataset_uri == f"s3://{bucket}/datasets/tiles/" for v in jobs)

        assert await eventually(started)
    finally:
        await poller.close()
    assert poller._task is None
