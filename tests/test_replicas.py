"""Two ingress processes, the same bucket events from every side: one job per object.

Two real `python -m ingress` processes on RabbitMQ, nx-27017 (MongoDB protocol) and moto's S3
and SQS. Thirty datasets are dropped in a bucket that notifies an SQS queue both processes poll;
at the same time MinIO-style webhook events for the same objects are posted to both processes,
and every SQS notification is delivered twice (a slow batch redelivered). What must hold: each
object started exactly one job (rule 10 of infra/views/merge.py), and the queue holds one
request per object.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from infra.bus import BusSettings
from infra.bus.rabbit import RabbitBus
from infra.views import MongoJobViewStore
from schemas import JobState
from schemas.topology import Topology
from tests.fixtures.rabbit import TEST_SETTINGS, delete_topology
from tests.test_bucket_trigger import minio_event, sqs_bucket  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
OBJECTS = 30
TOKEN = "replica-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def topology(amqp_url: str) -> AsyncIterator[Topology]:
    topology = Topology(prefix=f"test-{uuid.uuid4().hex[:12]}")
    yield topology
    await delete_topology(amqp_url, topology)


async def start_ingress(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen([sys.executable, "-m", "ingress"], cwd=REPO, env={**env, "CDTRAIN_PORT": str(port)},
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            try:
                async with http.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return process, url
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "the ingress was not ready within 60 s"
            await asyncio.sleep(0.2)


async def test_two_ingress_processes_start_one_job_per_object(
        tmp_path: Path, amqp_url: str, topology: Topology, mongodb_url: str, mongo_view_store: MongoJobViewStore,
        s3_settings: Any, sqs_bucket: tuple[Any, Any, str, str]) -> None:
    sqs, s3, queue_url, s3_bucket = sqs_bucket  # the bucket notifies the queue (datasets/ only)
    env = {**os.environ, "CDTRAIN_HOST": "127.0.0.1", "CDTRAIN_BUS_URL": amqp_url,
           "CDTRAIN_TOPOLOGY_PREFIX": topology.prefix, "CDTRAIN_MONGODB_URL": mongodb_url,
           "CDTRAIN_MONGODB_DATABASE": mongo_view_store.collection.database.name,
           "CDTRAIN_S3_ENDPOINT_URL": s3_settings.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "CDTRAIN_API_TOKEN": TOKEN, "CDTRAIN_WEBHOOK_TOKEN": TOKEN, "CDTRAIN_SQS_QUEUE_URL": queue_url,
           "CDTRAIN_SQS_ENDPOINT_URL": s3_settings.endpoint_url, "CDTRAIN_SQS_REGION": "us-east-1",
           "CDTRAIN_SQS_WAIT_S": "1", "CDTRAIN_ALLOWED_URIS": f"s3://{s3_bucket}/datasets/"}
    bus = RabbitBus(BusSettings(url=amqp_url, **TEST_SETTINGS), topology)
    await bus.connect()
    replicas: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        # A slow SQS batch redelivered: every notification is in the queue twice.
        keys = [f"datasets/set-{i:02d}/_READY" for i in range(OBJECTS)]
        etags = {}
        for key in keys:
            etags[key] = (await s3.put_object(Bucket=s3_bucket, Key=key, Body=b""))["ETag"].strip('"')
        copied: set[str] = set()  # bodies: a copy reads back like its original, and is not copied again
        held: list[str] = []
        deadline = time.monotonic() + 60
        while len(copied) < OBJECTS:
            assert time.monotonic() < deadline, f"only {len(copied)} of {OBJECTS} notifications reached SQS"
            got = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            for message in got.get("Messages", []):
                if message["Body"] not in copied:
                    await sqs.send_message(QueueUrl=queue_url, MessageBody=message["Body"])
                    copied.add(message["Body"])
                held.append(message["ReceiptHandle"])  # in flight until all are copied
        for handle in held:
            await sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=handle, VisibilityTimeout=0)
        # The replicas start once every notification is in the queue twice: their pollers would
        # otherwise take some first, and the copies could never all be made.
        replicas += [await start_ingress(env, tmp_path / f"ingress-{i}.log") for i in range(2)]
        # ...while the webhook brings the same objects to both processes at once.
        async with aiohttp.ClientSession() as http:
            async def post(url: str, key: str) -> str:
                async with http.post(f"{url}/events/s3", json=minio_event(s3_bucket, key, etag=etags[key]),
                                     headers=AUTH) as response:
                    assert response.status == 200, await response.text()
                    return (await response.json())["results"][0]["action"]

            actions = await asyncio.gather(*(post(url, key) for key in keys for _, url in replicas))
        assert set(actions) <= {"started", "duplicate"}

        deadline = time.monotonic() + 90
        while True:  # until both pollers have drained the SQS queue
            attributes = (await sqs.get_queue_attributes(
                QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages",
                                                    "ApproximateNumberOfMessagesNotVisible"]))["Attributes"]
            if attributes["ApproximateNumberOfMessages"] == "0" and attributes[
                    "ApproximateNumberOfMessagesNotVisible"] == "0":
                break
            assert time.monotonic() < deadline, f"SQS not drained: {attributes}"
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)

        views, _ = await mongo_view_store.list(limit=100)
        started = Counter(v.trigger.key for v in views if v.trigger is not None)
        assert sorted(started) == sorted(keys) and set(started.values()) == {1}
        assert all(v.state is JobState.QUEUED and v.accepted_attempt == 0 for v in views)
        assert await bus.request_backlog() == OBJECTS  # one request per object, none twice
        webhook_started = Counter(action for action in actions)["started"]
        print(f"\n{OBJECTS} objects x (2 webhook posts + 2 SQS copies): {len(views)} jobs, "
              f"{await bus.request_backlog()} requests; webhook 'started' answers {webhook_started}, "
              f"the SQS pollers started the rest")
        assert webhook_started <= OBJECTS
    finally:
        await bus.close()
        for process, _ in replicas:
            process.send_signal(signal.SIGTERM)
        for process, _ in replicas:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        for path in tmp_path.glob("ingress-*.log"):
            text = path.read_text(errors="replace")
            assert "Traceback" not in text, text[-3000:]
