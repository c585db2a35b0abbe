"""No token, password, key or presigned URL leaves the service: known secrets in, every output grepped.

One real ``cdtrain serve`` process (ingress, projector and worker) on RabbitMQ as a user with its own
password, nx-27017, moto's S3 with a secret key and a session token, and MLflow on SQLite, logging at
DEBUG (where client libraries print the most). It is sent a job that trains and registers, a job
whose config file holds a value that must not be echoed, requests with wrong tokens and a presigned
URL. Then every output is searched for every secret: the process's log, every status event, the job
views, and the MLflow runs (params, tags, metrics) and model versions.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from mlflow import MlflowClient

from infra.bus import BusSettings
from infra.bus.rabbit import RabbitBus
from infra.objects import S3ObjectStore
from infra.views import MongoJobViewStore
from schemas import StatusEvent
from schemas.topology import Topology
from snunet_cbam.synthetic import make_synthetic_dataset
from tests.fixtures.rabbit import TEST_SETTINGS, delete_topology
from tests.test_ingress import REPO, free_port

pytestmark = pytest.mark.slow

TINY = {"base_channel": 4, "crop_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu", "compile": False,
        "amp": False, "window_size": 64, "window_overlap": 8, "crops_per_image": 1, "epochs": 2}


def _secret(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def _rabbitmqctl(*args: str) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not on PATH: this test adds a broker user with its own password "
                    "(install RabbitMQ's CLI, or run the tests on the broker's machine)", pytrace=False)
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"rabbitmqctl {args[0]} failed: {done.stdout}{done.stderr}"


@pytest.fixture
async def broker_user(amqp_url: str) -> AsyncIterator[tuple[str, str]]:
    """(amqp URL of a user with a secret password, the password)."""
    user, password = f"cdtrain-test-{uuid.uuid4().hex[:8]}", _secret("amqp-pw")
    _rabbitmqctl("add_user", user, password)
    try:
        _rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        where = urlsplit(amqp_url)
        yield f"amqp://{user}:{password}@{where.hostname}:{where.port or 5672}/", password
    finally:
        _rabbitmqctl("delete_user", user)


@pytest.fixture
async def topology(amqp_url: str) -> AsyncIterator[Topology]:
    topology = Topology(prefix=f"test-{uuid.uuid4().hex[:12]}")
    yield topology
    await delete_topology(amqp_url, topology)


async def _until(probe: Any, timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:.0f} s; log tail:\n"
                                 + log.read_text(errors="replace")[-4000:])
        await asyncio.sleep(0.5)


async def test_no_secret_reaches_logs_events_views_or_mlflow(
        tmp_path: Path, amqp_url: str, broker_user: tuple[str, str], topology: Topology, mongodb_url: str,
        mongo_view_store: MongoJobViewStore, s3_settings: Any, s3_store: S3ObjectStore, s3_bucket: str) -> None:
    bus_url, amqp_password = broker_user
    api_token, hook_token = _secret("api-token"), _secret("hook-token")
    s3_secret, s3_session = _secret("s3-secret-key"), _secret("s3-session-token")
    config_value, signature = _secret("config-value"), _secret("sig").replace("-", "")
    secrets = {"API token": api_token, "webhook token": hook_token, "broker password": amqp_password,
               "S3 secret key": s3_secret, "S3 session token": s3_session,
               "a config file's value": config_value, "a presigned URL's signature": signature}

    data = make_synthetic_dataset(tmp_path / "data", pairs=12, size=64, seed=5).root
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        await s3_store.upload_file(s3_bucket, f"data/{path.relative_to(data).as_posix()}", path)
    await s3_store.put_bytes(s3_bucket, "configs/good.yaml", json.dumps(TINY).encode())
    await s3_store.put_bytes(s3_bucket, "configs/bad.yaml", f"epochs: {config_value}\nlr: 0.001\n".encode())
    (tmp_path / "api-token").write_text(api_token + "\n")

    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CDTRAIN_", "AWS_", "MLFLOW_"))}
    env = {**base, "CDTRAIN_HOST": "127.0.0.1", "CDTRAIN_PORT": str(port), "CDTRAIN_DATA_DIR": str(tmp_path / "svc"),
           "CDTRAIN_BUS_URL": bus_url, "CDTRAIN_TOPOLOGY_PREFIX": topology.prefix,
           "CDTRAIN_MONGODB_URL": mongodb_url, "CDTRAIN_MONGODB_DATABASE": mongo_view_store.collection.database.name,
           "CDTRAIN_S3_ENDPOINT_URL": s3_settings.endpoint_url, "AWS_ACCESS_KEY_ID": "test-access-key",
           "AWS_SECRET_ACCESS_KEY": s3_secret, "AWS_SESSION_TOKEN": s3_session, "AWS_DEFAULT_REGION": "us-east-1",
           "CDTRAIN_API_TOKEN_FILE": str(tmp_path / "api-token"), "CDTRAIN_WEBHOOK_TOKEN": hook_token,
           "CDTRAIN_ALLOWED_URIS": f"s3://{s3_bucket}/", "CDTRAIN_CHECKPOINT_URI": f"s3://{s3_bucket}/checkpoints/",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CDTRAIN_LOG_LEVEL": "DEBUG",
           "CDTRAIN_HEARTBEAT_S": "1"}
    log_path = tmp_path / "service.log"
    events: list[str] = []
    watcher_bus = RabbitBus(BusSettings(url=amqp_url, **TEST_SETTINGS), topology)
    await watcher_bus.connect()

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        events.append(event.model_dump_json())

    watcher = await watcher_bus.subscribe_status("job.#", on_status, model=StatusEvent)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "cdtrain", "serve"], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {api_token}"}
    answers: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                assert process.poll() is None, log_path.read_text(errors="replace")[-4000:]
                try:
                    async with http.get(f"{url}/readyz") as resp:
                        answers.append(await resp.text())
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await _until(ready, 120, "the service ready", log_path)

            async def post(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, str]:
                async with http.post(f"{url}/train", json=body, headers=headers) as resp:
                    text = await resp.text()
                    answers.append(text)
                    return resp.status, text

            dataset = f"s3://{s3_bucket}/data/"
            assert (await post({"dataset_uri": dataset}, {}))[0] == 401
            assert (await post({"dataset_uri": dataset}, {"Authorization": f"Bearer {hook_token}"}))[0] == 401
            signed = f"s3://{s3_bucket}/data/x.zip?X-Amz-Credential=AKIAX&X-Amz-Signature={signature}"
            assert (await post({"dataset_uri": signed}, auth))[0] == 422
            status, good = await post({"dataset_uri": dataset, "config_uri": f"s3://{s3_bucket}/configs/good.yaml",
                                       "register_model": True}, auth)
            assert status == 202, good
            status, bad = await post({"dataset_uri": dataset, "config_uri": f"s3://{s3_bucket}/configs/bad.yaml"},
                                     auth)
            assert status == 202, bad
            job_ids = [json.loads(good)["job_id"], json.loads(bad)["job_id"]]

            async def ended() -> list[dict[str, Any]] | None:
                views = []
                for job_id in job_ids:
                    async with http.get(f"{url}/train/{job_id}", headers=auth) as resp:
                        views.append(await resp.json())
                return views if all(v["state"] in ("succeeded", "failed") for v in views) else None

            good_view, bad_view = await _until(ended, 300, "both jobs ended", log_path)
            assert good_view["state"] == "succeeded" and good_view["model_version"], good_view
            assert bad_view["state"] == "failed" and "'epochs'" in bad_view["error"], bad_view
            async with http.get(f"{url}/train?limit=100", headers=auth) as resp:
                answers.append(await resp.text())
            for job_id in job_ids:
                async with http.get(f"{url}/train/{job_id}", headers=auth) as resp:
                    answers.append(await resp.text())
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        await watcher.close()
        await watcher_bus.close()

    mlflow = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("cdtrain").experiment_id])
    tracked = [json.dumps({"params": r.data.params, "tags": r.data.tags, "metrics": sorted(r.data.metrics)})
               for r in runs]
    tracked += [json.dumps({"tags": v.tags, "description": v.description, "source": v.source})
                for v in mlflow.search_model_versions("name = 'snunet-cbam'")]
    outputs = {"the log": log_path.read_text(errors="replace"), "status events": "\n".join(events),
               "HTTP answers and job views": "\n".join(answers), "MLflow": "\n".join(tracked)}
    # Each output really holds what it should, so "no secret found" means something.
    assert "started job" in outputs["the log"] or "job" in outputs["the log"]
    assert "DEBUG" in outputs["the log"] and len(outputs["the log"]) > 10_000
    assert len(events) >= 8 and all(job_id in outputs["status events"] for job_id in job_ids)
    assert dataset in outputs["MLflow"] and runs  # the failed job ended before it had a run
    for where, text in outputs.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} found in {where}"
