"""The whole service, end to end, as a user drives it: over HTTP and by dropping into a bucket.

Each scenario runs twice: on the embedded parts (in-process bus, local-directory bucket, JSON
view store) and on the real services (RabbitMQ, nx-27017 over the MongoDB protocol, moto's S3
with real S3→SQS notifications). MLflow is real in both (a SQLite store).
"""

from __future__ import annotations

import asyncio
import io
import shutil
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import aiohttp
import pytest
import pytest_asyncio
import yaml
from mlflow import MlflowClient
from PIL import Image

from cdtrain.serve import ROLES, serve
from cdtrain.settings import ServiceSettings
from infra.bus import BusSettings, InProcessBus, MemoryBroker, MessageBus, create_bus
from infra.objects import S3ObjectStore, S3Settings
from ingress.settings import IngressSettings, SqsSettings
from schemas import StatusEvent, new_job_id
from schemas.topology import Topology, job_binding_key
from snunet_cbam.synthetic import make_synthetic_dataset
from tests.fixtures.rabbit import delete_topology

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 240.0
# Tiny, CPU-only jobs: the service is under test here, not the recipe.
TINY = {"base_channel": 4, "crop_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu", "compile": False,
        "amp": False, "window_size": 64, "window_overlap": 8, "crops_per_image": 1}
# Taught that change costs nothing to miss: it predicts no change at all (F1 0), so any model
# that finds some change beats it. Its threshold stays 0.5 (no tuning), so it scores F1 0 on
# any data, also when a later job scores it as the champion.
WEAK = {**TINY, "epochs": 1, "lr": 0.05, "weight_dice": 0, "pos_weight": 0.001, "tune_threshold": False}
STRONG = {**TINY, "epochs": 4, "lr": 0.005, "scheduler": "constant", "warmup_ratio": 0, "rotate_prob": 0,
          "color_jitter_prob": 0, "blur_prob": 0, "weight_decay": 0}


@dataclass
class Stack:
    kind: str
    url: str
    bucket: str
    mlflow: MlflowClient
    put_object: Callable[[str, bytes], Awaitable[None]]
    watcher_bus: MessageBus  # a bus of our own, to subscribe as any outside subscriber would


def dataset_zip(root: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, f"scene/{path.relative_to(root).as_posix()}")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), pairs=16, size=64, seed=3).root


async def _run_stack(settings: ServiceSettings, broker: MemoryBroker | None) -> tuple[asyncio.Task, asyncio.Event, str]:
    stop = asyncio.Event()
    started: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, ROLES, stop, on_started=started.set_result, broker=broker))
    done, _ = await asyncio.wait({task, started}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    if started not in done:
        task.cancel()
        raise RuntimeError(f"the service did not start: {task.exception() if task.done() else 'timeout'}")
    return task, stop, started.result()[0]


@pytest_asyncio.fixture(scope="module", params=["embedded", "real"])
async def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, amqp_url: str,
                mongodb_url: str, s3_settings: S3Settings) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp(f"stack-{request.param}")
    mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    # Tiny CPU models score near "change everywhere": the quality gate is turned off (a margin of
    # -1) so that these scenarios test champion against challenger; tests/test_tracking.py and
    # tests/test_worker.py test the gate.
    base = dict(data_dir=root / "data", mlflow_tracking_uri=mlflow_uri, heartbeat_interval=2.0,
                promotion_margin=-1.0)
    cleanup: list[Callable[[], Awaitable[None]]] = []

    if request.param == "embedded":
        objects = root / "objects"
        ingress = IngressSettings(port=0, view_store_url=str(root / "views.json"), local_objects_dir=objects)
        settings = ServiceSettings(ingress=ingress, allow_local_paths=True, **base)
        broker = MemoryBroker(Topology(prefix=ingress.topology_prefix))
        watcher_bus: MessageBus = InProcessBus(ingress.bus, broker=broker)

        async def put_object(key: str, data: bytes) -> None:
            path = objects / bucket / key
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.part")  # hidden while it is being written
            tmp.write_bytes(data)
            tmp.rename(path)
    else:
        topology = Topology(prefix=f"e2e-{uuid.uuid4().hex[:8]}")
        session = aioboto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                   region_name="us-east-1")
        async with session.client("s3", endpoint_url=s3_settings.endpoint_url) as s3, \
                session.client("sqs", endpoint_url=s3_settings.endpoint_url) as sqs:
            await s3.create_bucket(Bucket=bucket)
            queue_url = (await sqs.create_queue(QueueName=f"{bucket}-events"))["QueueUrl"]
            arn = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"]))[
                "Attributes"]["QueueArn"]
            await s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={
                "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
        ingress = IngressSettings(
            port=0, bus=BusSettings(url=amqp_url), topology_prefix=topology.prefix, view_store_url=mongodb_url,
            view_store_database=f"e2e_{uuid.uuid4().hex[:8]}", s3=s3_settings,
            sqs=SqsSettings(queue_url=queue_url, endpoint_url=s3_settings.endpoint_url, wait_time_s=1),
        )
        settings = ServiceSettings(ingress=ingress, **base)
        broker = None
        watcher_bus = create_bus(BusSettings(url=amqp_url), topology)
        store = S3ObjectStore(s3_settings)
        cleanup.append(store.close)
        cleanup.append(lambda: delete_topology(amqp_url, topology))

        async def put_object(key: str, data: bytes) -> None:
            await store.put_bytes(bucket, key, data)

    task, stop, url = await _run_stack(settings, broker)
    await watcher_bus.connect()
    try:
        yield Stack(request.param, url, bucket, MlflowClient(tracking_uri=mlflow_uri), put_object, watcher_bus)
    finally:
        await watcher_bus.close()
        stop.set()
        await asyncio.wait_for(task, 60)
        for step in reversed(cleanup):
            await step()


async def wait_for_job(stack: Stack, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(f"{stack.url}/train/{job_id}") as response:
                if response.status == 200:
                    view = await response.json()
                    if view["state"] in ("succeeded", "failed", "cancelled"):
                        return view
            await asyncio.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s; last view: {view}")


async def post_train(stack: Stack, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(f"{stack.url}/train", json=body) as response:
        return response.status, await response.json()


async def dataset_uri(stack: Stack, synthetic: Path, name: str) -> str:
    """The synthetic dataset as a prefix in the bucket (uploaded under a name outside datasets/,
    so it does not trigger a job by itself)."""
    for path in sorted(synthetic.rglob("*")):
        if path.is_file():
            await stack.put_object(f"uploads/{name}/{path.relative_to(synthetic).as_posix()}", path.read_bytes())
    return f"s3://{stack.bucket}/uploads/{name}/"


async def test_rest_submission_succeeds_with_a_staged_model_and_a_subscriber_sees_every_event(
        stack: Stack, synthetic: Path) -> None:
    uri = await dataset_uri(stack, synthetic, "rest")
    key = f"rest-{uuid.uuid4().hex}"
    job_id = new_job_id(key)
    seen: list[StatusEvent] = []

    async def collect(event: StatusEvent, _delivery: Any) -> None:
        seen.append(event)

    subscription = await stack.watcher_bus.subscribe_status(job_binding_key(job_id), collect, model=StatusEvent)
    started = time.perf_counter()
    status, body = await post_train(stack, {"dataset_uri": uri, "register_model": True, "config": WEAK,
                                            "model_name": "cd-e2e", "idempotency_key": key})
    post_seconds = time.perf_counter() - started
    assert status == 202 and body["job_id"] == job_id, body
    assert post_seconds < 5

    view = await wait_for_job(stack, job_id)
    await asyncio.sleep(0.5)
    await subscription.close()
    assert view["state"] == "succeeded", view["error"]
    assert view["epochs"] == 1 and len(view["history"]) == 1
    assert view["model_version"] is not None and view["mlflow_run_id"]

    states = [e.data.state.value for e in seen]
    assert states[0] == "queued" and states[-1] == "succeeded"
    assert states.index("starting") < states.index("running")
    sequences = [e.data.sequence for e in seen]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    epoch_events = [e for e in seen if e.data.state.value == "running" and e.data.metrics and e.data.epoch]
    assert [e.data.epoch for e in epoch_events] == [1]
    assert "val_f1" in epoch_events[0].data.metrics and "lr" in epoch_events[0].data.metrics

    version = stack.mlflow.get_model_version_by_alias("cd-e2e", "staging")
    assert str(version.version) == view["model_version"]
    # The first version of the name, and the gate is off here: production, and the view says why.
    assert view["model_alias"] == "production"
    assert view["model_decision"].startswith("first production version: F1 ")
    assert version.tags["promotion_reason"] == view["model_decision"] and version.tags["promotion"] == "promoted"
    succeeded = next(e for e in seen if e.data.state.value == "succeeded")
    assert succeeded.data.model_decision == view["model_decision"]
    run = stack.mlflow.get_run(view["mlflow_run_id"])
    assert run.data.params["epochs"] == "1" and run.data.params["pos_weight"] == "0.001"
    assert "val_f1" in run.data.metrics and run.info.status == "FINISHED"


async def test_archive_dropped_in_the_bucket_trains_and_a_better_model_is_promoted(
        stack: Stack, synthetic: Path) -> None:
    production_before = _production_version(stack.mlflow, "cd-e2e")
    # The config beside the archive gives only the keys it changes.
    await stack.put_object("datasets/scene-7/train_config.yaml", yaml.safe_dump(STRONG).encode())
    dropped = time.perf_counter()
    await stack.put_object("datasets/scene-7/scene.zip", dataset_zip(synthetic))

    view = await _wait_for_bucket_job(stack, "datasets/scene-7/scene.zip")
    queued_seconds = time.perf_counter() - dropped
    assert queued_seconds < 30
    view = await wait_for_job(stack, view["job_id"])
    assert view["state"] == "succeeded", view["error"]
    assert view["source"] == "bucket" and view["trigger"]["key"] == "datasets/scene-7/scene.zip"
    assert view["request"]["config_uri"].endswith("datasets/scene-7/train_config.yaml")
    assert view["epochs"] == STRONG["epochs"] and len(view["history"]) == STRONG["epochs"]
    # Trigger jobs register under the default model name; register once more under ours to
    # compare with the weak model of the first scenario.
    assert view["model_version"] is not None

    status, body = await post_train(stack, {"dataset_uri": f"s3://{stack.bucket}/datasets/scene-7/scene.zip",
                                            "config_uri": view["request"]["config_uri"], "register_model": True,
                                            "model_name": "cd-e2e"})
    assert status == 202
    better = await wait_for_job(stack, body["job_id"])
    assert better["state"] == "succeeded", better["error"]
    weak_f1 = float(stack.mlflow.get_model_version("cd-e2e", production_before).tags["val_f1"]) \
        if production_before else 0.0
    assert better["best_metrics"]["val_f1"] > weak_f1, (better["best_metrics"], weak_f1)
    assert better["model_alias"] == "production", better["model_decision"]
    production = stack.mlflow.get_model_version_by_alias("cd-e2e", "production")
    assert str(production.version) == better["model_version"]
    if production_before is not None:
        # Judged on this job's data: the weak champion's checkpoint, from its run, scored there too.
        assert f"beats production v{production_before}'s " in better["model_decision"]
        assert better["model_decision"].endswith("on the same data")
        assert float(production.tags["champion_f1"]) < float(production.tags["challenger_f1"])
        assert production.tags["promoted_over"] == production_before
        assert stack.mlflow.get_model_version("cd-e2e", production_before).current_stage == "Archived"


async def test_bad_dataset_ends_failed_with_a_reason_a_person_can_act_on(stack: Stack, synthetic: Path,
                                                                          tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(synthetic, broken)
    Image.new("RGB", (40, 40)).save(broken / "B" / "pair_0001.png")  # A and label are 64x64
    (broken / "label" / "pair_0002.png").unlink()
    uri = await dataset_uri(stack, broken, "broken")
    status, body = await post_train(stack, {"dataset_uri": uri, "config": WEAK})
    assert status == 202
    view = await wait_for_job(stack, body["job_id"])
    assert view["state"] == "failed"
    assert "pair_0001.png: size mismatch" in view["error"] and "B 40x40" in view["error"]
    assert "pair_0002.png: missing label" in view["error"]
    assert "skip_invalid" in view["error"]

    status, body = await post_train(stack, {"dataset_uri": f"s3://{stack.bucket}/nothing-here/", "config": WEAK})
    view = await wait_for_job(stack, body["job_id"])
    assert view["state"] == "failed" and "no objects under" in view["error"]


async def test_bad_requests_are_refused_with_the_field_named(stack: Stack) -> None:
    status, body = await post_train(stack, {"dataset_uri": f"s3://{stack.bucket}/x/", "config": {"epochz": 3}})
    assert status == 422 and "epochz" in str(body)
    status, body = await post_train(stack, {"config_uri": "s3://b/c.yaml"})
    assert status == 422 and body["field"] == "dataset_uri"


async def _wait_for_bucket_job(stack: Stack, key: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(f"{stack.url}/train", params={"limit": "20"}) as response:
                for job in (await response.json())["jobs"]:
                    if job.get("trigger") and job["trigger"]["key"] == key:
                        return job
            await asyncio.sleep(0.3)
    raise AssertionError(f"no job started for {key} within {timeout} s")


def _production_version(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, "production").version)
    except Exception:  # noqa: BLE001 - no registered model or no alias yet
        return None


async def test_cancel_stops_a_running_job_and_a_queued_one_never_starts(stack: Stack, synthetic: Path) -> None:
    uri = await dataset_uri(stack, synthetic, "cancel")
    seen: list[StatusEvent] = []

    async def collect(event: StatusEvent, _delivery: Any) -> None:
        seen.append(event)

    subscription = await stack.watcher_bus.subscribe_status("job.#", collect, model=StatusEvent)
    long = {**TINY, "epochs": 500}
    _, running = await post_train(stack, {"dataset_uri": uri, "config": long})
    _, queued = await post_train(stack, {"dataset_uri": uri, "config": long})  # behind it: one job per worker
    running_id, queued_id = running["job_id"], queued["job_id"]
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{stack.url}/train/{queued_id}") as response:
            assert response.status == 202 and (await response.json())["state"] == "QUEUED"
        deadline = time.monotonic() + JOB_TIMEOUT
        while not any(e.job_id == running_id and e.data.epoch == 1 and e.data.metrics for e in seen):
            assert time.monotonic() < deadline, "the first job never finished an epoch"
            await asyncio.sleep(0.2)
        async with http.delete(f"{stack.url}/train/{running_id}") as response:
            assert response.status == 202 and (await response.json())["state"] == "RUNNING"

    stopped = await wait_for_job(stack, running_id, timeout=30)
    assert stopped["state"] == "cancelled" and stopped["error"] == "cancelled by request"
    assert stack.mlflow.get_run(stopped["mlflow_run_id"]).info.status == "KILLED"
    skipped = await wait_for_job(stack, queued_id, timeout=30)
    assert skipped["state"] == "cancelled" and skipped["mlflow_run_id"] is None
    await subscription.close()
    assert [e.data.state.value for e in seen if e.job_id == queued_id] == ["queued", "cancelled"]
