"""JSON logs (``CDTRAIN_LOG_FORMAT=json``, infra/logs.py): every line one JSON object, with the job,
attempt and role where known, and secrets masked as in the plain-text format. In-process for
the formatter, the worker's job context and its training thread; as real processes for the
ingress and the projector."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from infra.bus import BusSettings
from infra.bus.rabbit import RabbitBus
from infra.logs import configure_logging, log_context
from schemas import JobState, StatusEvent, TrainJob, TrainRequest
from schemas.jobs import ATTEMPT_STRIDE
from schemas.redact import MASK
from schemas.topology import Topology

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-token-value"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure_logging changes the root logger: put it back as pytest had it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    filters = {h: list(h.filters) for h in handlers}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler, kept in filters.items():
        handler.filters[:] = kept
    root.setLevel(level)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line, each of which must be one JSON object."""
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the formatter -------------------------------------------------------------------------------
async def test_json_lines_carry_the_context_and_mask_secrets(root_logging: None) -> None:
    out = io.StringIO()
    configure_logging(level="INFO", fmt="json", secrets=[SECRET], role="consumer", stream=out)
    log = logging.getLogger("cdtrain.test")
    log.info("before any job")
    with log_context(job_id="job-1", attempt=2):
        log.warning("connecting with token %s", SECRET)
        # A thread started the way the worker starts training inherits the job's context.
        await asyncio.to_thread(log.info, "from the training thread")
        try:
            raise RuntimeError(f"refused: Authorization: Bearer {SECRET}")
        except RuntimeError:
            log.exception("call failed")
    log.info("after the job")

    lines = json_lines(out.getvalue())
    assert [line["message"] for line in lines] == [
        "before any job", f"connecting with token {MASK}", "from the training thread", "call failed", "after the job"]
    for line in lines:
        assert set(line) >= {"time", "level", "logger", "message", "role"}
        assert line["logger"] == "cdtrain.test" and line["role"] == "consumer"
        assert line["time"].endswith("+00:00")
    assert "job_id" not in lines[0] and "attempt" not in lines[0] and "job_id" not in lines[-1]
    for line in lines[1:4]:
        assert (line["job_id"], line["attempt"]) == ("job-1", 2), line
    assert lines[1]["level"] == "WARNING"
    assert "RuntimeError" in lines[3]["exception"] and f"Bearer {MASK}" in lines[3]["exception"]
    assert SECRET not in out.getvalue()


def test_text_stays_the_default_and_masks_too(root_logging: None) -> None:
    out = io.StringIO()
    configure_logging(secrets=[SECRET], stream=out)
    with log_context(job_id="job-2"):
        logging.getLogger("cdtrain.test").info("token %s", SECRET)
    (line,) = out.getvalue().splitlines()
    assert line.endswith(f" INFO cdtrain.test: token {MASK}")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_configuring_again_replaces_the_handler(root_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(fmt="json", stream=first)
    configure_logging(fmt="json", stream=second)
    logging.getLogger("cdtrain.test").warning("once")
    assert first.getvalue() == "" and json_lines(second.getvalue())[0]["message"] == "once"
    with pytest.raises(ValueError):
        configure_logging(fmt="xml")  # type: ignore[arg-type]


# --- a worker's job ------------------------------------------------------------------------------
@pytest.mark.slow
async def test_a_jobs_log_lines_name_it_and_its_attempt(amqp_url: str, rabbit_topology: Topology, tmp_path: Path,
                                                        root_logging: None) -> None:
    """Lines of the job handler (event loop) and of the trainer (training thread) alike."""
    from mlflow import MlflowClient

    from consumer.stores import StoreResolver
    from consumer.tracking.job_tracker import MlflowJobTracker
    from consumer.worker import TrainingWorker, WorkerSettings
    from infra.objects import LocalObjectStore
    from snunet_cbam.synthetic import make_synthetic_dataset
    from tests.test_worker import TINY

    out = io.StringIO()
    configure_logging(level="INFO", fmt="json", role="consumer", stream=out)
    # The bus connects after the role is set, as in a process: its consumer tasks inherit it.
    bus = RabbitBus(BusSettings(url=amqp_url), rabbit_topology)
    await bus.connect()
    objects = tmp_path / "objects"
    make_synthetic_dataset(objects / "lake" / "data", pairs=12, size=64, seed=5)
    tracker = MlflowJobTracker(MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "json-logs",
                               artifact_location=(tmp_path / "artifacts").as_uri())
    worker = TrainingWorker(bus, StoreResolver(LocalObjectStore(objects)), tracker,
                            WorkerSettings(work_dir=tmp_path / "work", heartbeat_interval=0.5))
    ended: list[StatusEvent] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        if event.data.state.is_terminal:
            ended.append(event)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/data/", config={**TINY, "epochs": 1,
                                                                                "test_split": None}))
    await bus.publish_request(job)
    subscription = await bus.consume_requests(worker.handle, model=TrainJob, prefetch=1)
    try:
        for _ in range(2400):
            if ended and worker.idle:
                break
            await asyncio.sleep(0.1)
    finally:
        await subscription.close()
        await watcher.close()
        await worker.close()
        await bus.close()
    assert ended and ended[0].data.state == JobState.SUCCEEDED, ended and ended[0].data.error

    lines = json_lines(out.getvalue())
    mine = [line for line in lines if line.get("job_id") == job.job_id]
    assert all(line["attempt"] == 0 and line["role"] == "consumer" for line in mine), mine
    loggers = {line["logger"] for line in mine}
    assert "consumer.dataset_fetch" in loggers, loggers  # the handler, on the event loop
    assert "snunet_cbam.trainer" in loggers, loggers  # the training thread
    assert all(line["role"] == "consumer" for line in lines)


# --- real processes ------------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CDTRAIN_", "AWS_"))}
    return {**base, "CDTRAIN_LOG_FORMAT": "json", **extra}


async def _wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 60.0, expect: str = "") -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.poll() is None, f"the process exited ({proc.returncode})"
            try:
                async with http.get(url) as resp:
                    if resp.status == 200 and expect in await resp.text():
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout:g} s"
            await asyncio.sleep(0.2)


async def test_a_real_ingress_process_logs_json(amqp_url: str, tmp_path: Path) -> None:
    port = free_port()
    log_file = tmp_path / "ingress.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingress"], cwd=REPO, stdout=log_file.open("w"), stderr=subprocess.STDOUT,
        env=_env(CDTRAIN_BUS_URL=amqp_url, CDTRAIN_PORT=str(port), CDTRAIN_MONGODB_URL="memory://",
                 CDTRAIN_TOPOLOGY_PREFIX=f"json-logs-{port}", CDTRAIN_API_TOKEN=SECRET,
                 CDTRAIN_WEBHOOK_TOKEN=SECRET + "-hook", CDTRAIN_ALLOWED_URIS="s3://lake",
                 CDTRAIN_LOCAL_OBJECTS_DIR=str(tmp_path)))
    try:
        await _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        async with aiohttp.ClientSession() as http:
            # A wrong token: answered 401, and logged nowhere.
            async with http.get(f"http://127.0.0.1:{port}/train", headers={"Authorization": "Bearer nope"}) as resp:
                assert resp.status == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = log_file.read_text()
    lines = json_lines(out)
    assert any(line["message"].startswith("ingress listening on") for line in lines), out
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line) and line["role"] == "ingress", line
    assert SECRET not in out


async def test_a_real_projector_process_logs_the_event_it_projects(amqp_url: str, rabbit_topology: Topology,
                                                                   mongodb_url: str, tmp_path: Path) -> None:
    """``cdtrain serve --role projector``: a duplicate event's debug line names its job and attempt."""
    metrics_port = free_port()
    # A file, not a pipe: nobody reads a pipe until the end, and DEBUG lines would fill it and
    # block the process.
    log_file = tmp_path / "projector.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdtrain", "serve", "--role", "projector"], cwd=REPO,
        stdout=log_file.open("w"), stderr=subprocess.STDOUT,
        env=_env(CDTRAIN_BUS_URL=amqp_url, CDTRAIN_TOPOLOGY_PREFIX=rabbit_topology.prefix,
                 CDTRAIN_MONGODB_URL=mongodb_url, CDTRAIN_MONGODB_DATABASE=f"json_logs_{metrics_port}",
                 CDTRAIN_DATA_DIR=str(tmp_path), CDTRAIN_LOG_LEVEL="DEBUG",
                 CDTRAIN_METRICS_PORT=str(metrics_port)))
    # The process declares the default topology under the test's prefix (the fixture deletes it).
    bus = RabbitBus(BusSettings(url=amqp_url), Topology(prefix=rabbit_topology.prefix))
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/datasets/j/"))
    try:
        # The projector's own figures appear once it consumes.
        await _wait_http(f"http://127.0.0.1:{metrics_port}/metrics", proc,
                         expect="\ncdtrain_projector_view_store_up 1.0")
        await bus.connect()
        queued = StatusEvent.queued(job, source="/test/ingress")
        attempt = 3
        running = StatusEvent.for_job(job.job_id, attempt * ATTEMPT_STRIDE + 1, JobState.RUNNING,
                                      source="/test/worker")
        for event in (queued, running, running):  # the third: a duplicate, logged at DEBUG
            await bus.publish_status(event, event.routing_key, message_id=event.id)
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                    text = await resp.text()
                if 'cdtrain_projector_events_total{result="ignored"} 1.0' in text:
                    break
                assert time.monotonic() < deadline, f"the duplicate was not projected within 30 s:\n{text}"
                await asyncio.sleep(0.1)
    finally:
        await bus.close()
        proc.terminate()
        proc.wait(timeout=30)
    out = log_file.read_text()
    lines = json_lines(out)
    assert all(line["role"] == "projector" for line in lines), [line for line in lines if line["role"] != "projector"]
    duplicate = [line for line in lines if "is a duplicate or stale" in line["message"]]
    assert duplicate, out[-3000:]
    assert (duplicate[0]["job_id"], duplicate[0]["attempt"], duplicate[0]["logger"]) == (
        job.job_id, attempt, "infra.views.projector")
