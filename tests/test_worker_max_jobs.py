"""A worker that takes a set number of jobs and exits: one Kubernetes Job per train request.

Workers are real ``cdtrain serve --role consumer`` processes on RabbitMQ, nx-27017 (MongoDB
protocol), moto's S3 and MLflow on a SQLite file; the projector runs in the test. What must hold:
a worker started with ``--max-jobs 1`` before two queued requests trains one, exits 0, and the
other request stays in the queue, never delivered, for the next worker to run as its first
attempt; a one-job worker that finds the queue empty exits 0 after its idle time.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cdtrain.cli import main as cdtrain_main
from cdtrain.settings import DEFAULT_ONE_JOB_IDLE_EXIT_S, ServiceSettings
from consumer.roles import run_projector
from consumer.watchdog import Watchdog
from infra.bus import BusSettings
from infra.bus.rabbit import RabbitBus
from infra.objects import S3ObjectStore
from infra.views import MongoJobViewStore
from schemas import JobState, StatusEvent, TrainJob, TrainRequest
from schemas.jobs import ATTEMPT_STRIDE
from schemas.topology import Topology
from snunet_cbam.synthetic import make_synthetic_dataset
from tests.fixtures.rabbit import TEST_SETTINGS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# A CPU job of a few seconds.
CONFIG = {"base_channel": 4, "crop_size": 32, "batch_size": 2, "num_workers": 0, "device": "cpu", "compile": False,
          "amp": False, "window_size": 64, "window_overlap": 8, "crops_per_image": 1, "epochs": 1,
          "log_every_steps": 1, "patience": None}
CONSUMING = "worker consuming train requests"
# A worker's start (torch and MLflow imports, the SQLite store's migrations) on 2 busy cores.
START_S = 120


@dataclass
class Service:
    env: dict[str, str]
    views: MongoJobViewStore
    bus: RabbitBus
    tmp: Path
    dataset_uri: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([sys.executable, "-m", "cdtrain", "serve", "--role", "consumer", *args], cwd=REPO,
                                   env={**self.env, "CDTRAIN_DATA_DIR": str(self.tmp / name), **env},
                                   stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    async def until_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {name} never logged {text!r}:\n{self.log(name)}")
            await asyncio.sleep(0.2)

    async def exit_code(self, name: str, process: subprocess.Popen[bytes], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {name} still runs after {timeout} s:\n{self.log(name)[-3000:]}")
            await asyncio.sleep(0.2)
        return process.returncode

    async def submit(self) -> str:
        job = TrainJob(request=TrainRequest(dataset_uri=self.dataset_uri, config=CONFIG, register_model=False))
        queued = StatusEvent.queued(job, source="/test/ingress")
        await self.bus.publish_status(queued, queued.routing_key)
        await self.bus.publish_request(job, message_id=job.job_id)
        return job.job_id

    async def until_view(self, job_id: str, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            view = await self.views.get(job_id)
            if view is not None and predicate(view):
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached in {timeout} s; view: {view}")
            await asyncio.sleep(0.1)


@pytest.fixture
def topology(service_topology: Topology) -> Topology:
    return service_topology


@pytest.fixture
async def service(tmp_path: Path, amqp_url: str, topology: Topology, mongodb_url: str,
                  mongo_view_store: MongoJobViewStore, s3_settings: Any, s3_store: S3ObjectStore,
                  s3_bucket: str) -> AsyncIterator[Service]:
    data = make_synthetic_dataset(tmp_path / "data", pairs=6, size=64, seed=3).root
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        await s3_store.upload_file(s3_bucket, f"data/{path.relative_to(data).as_posix()}", path)
    env = {**os.environ,
           "CDTRAIN_BUS_URL": amqp_url, "CDTRAIN_TOPOLOGY_PREFIX": topology.prefix,
           "CDTRAIN_MONGODB_URL": mongodb_url, "CDTRAIN_MONGODB_DATABASE": mongo_view_store.collection.database.name,
           "CDTRAIN_S3_ENDPOINT_URL": s3_settings.endpoint_url, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "CDTRAIN_CHECKPOINT_URI": f"s3://{s3_bucket}/checkpoints/", "CDTRAIN_LOG_LEVEL": "INFO"}
    for name in ("CDTRAIN_WORKER_MAX_JOBS", "CDTRAIN_WORKER_IDLE_EXIT_S"):
        env.pop(name, None)
    bus = RabbitBus(BusSettings(url=amqp_url, **TEST_SETTINGS), topology)
    await bus.connect()
    stop = asyncio.Event()
    watchdog = Watchdog(bus, mongo_view_store, stale_after=60, step_stall=None, source="/test/watchdog")
    projector = asyncio.create_task(run_projector(bus, mongo_view_store, watchdog, stop, sweep_interval=0.5,
                                                  poll_interval=0.1))
    service = Service(env, mongo_view_store, bus, tmp_path, f"s3://{s3_bucket}/data/")
    try:
        yield service
    finally:
        for process in service.workers:
            if process.poll() is None:
                process.kill()
            process.wait(30)
        stop.set()
        await asyncio.wait_for(projector, 30)
        await bus.close()


async def test_a_one_job_worker_trains_one_of_two_requests_and_leaves_the_other_queued(service: Service) -> None:
    jobs = [await service.submit(), await service.submit()]
    for job_id in jobs:
        await service.until_view(job_id, lambda v: v.state is JobState.QUEUED, 30, "queued")
    assert await service.bus.request_backlog() == 2

    first = service.start_worker("a", "--max-jobs", "1")
    assert await service.exit_code("a", first, START_S + 120) == 0, service.log("a")[-3000:]
    assert "took its 1 job(s)" in service.log("a") and "Traceback" not in service.log("a")
    views = {job_id: await service.views.get(job_id) for job_id in jobs}
    states = sorted(v.state.value for v in views.values())
    assert states == [JobState.QUEUED.value, JobState.SUCCEEDED.value], views
    (waiting,) = [job_id for job_id, v in views.items() if v.state is JobState.QUEUED]
    assert await service.bus.request_backlog() == 1

    # The next one-job worker (its limit from the environment, as in the Kubernetes Job) runs it as
    # attempt 0: the first worker never took the request, not even to hand it back.
    second = service.start_worker("b", CDTRAIN_WORKER_MAX_JOBS="1")
    assert await service.exit_code("b", second, START_S + 120) == 0, service.log("b")[-3000:]
    view = await service.until_view(waiting, lambda v: v.state.is_terminal, 30, "the second job's end")
    assert view.state is JobState.SUCCEEDED, view.error
    assert view.last_sequence // ATTEMPT_STRIDE == 0
    assert await service.bus.request_backlog() == 0


async def test_a_one_job_worker_exits_after_its_idle_time_on_an_empty_queue(service: Service) -> None:
    idle = service.start_worker("idle", "--max-jobs", "1", "--idle-exit", "3")
    await service.until_log("idle", CONSUMING, START_S)
    consuming_at = time.monotonic()
    assert await service.exit_code("idle", idle, 60) == 0, service.log("idle")[-3000:]
    assert time.monotonic() - consuming_at >= 2.5  # it waited (not: exited at once)
    assert "no train request for 3 s: exiting" in service.log("idle")
    # A request queued after it left is still there for the next worker.
    await service.submit()
    await asyncio.sleep(0.5)
    assert await service.bus.request_backlog() == 1


@pytest.mark.parametrize("argv", [
    ["serve", "--role", "projector", "--max-jobs", "1"],
    ["serve", "--role", "all", "--idle-exit", "5"],
    ["serve", "--role", "consumer", "--max-jobs", "0"],
    ["serve", "--role", "consumer", "--idle-exit", "0"],
])
def test_job_limits_are_refused_where_they_mean_nothing(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cdtrain_main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_job_limits_from_the_environment() -> None:
    base = {"CDTRAIN_DATA_DIR": ".cdtrain-unused"}
    assert ServiceSettings.from_env(base).worker_idle_exit is None  # a long-running worker never idles out
    one = ServiceSettings.from_env({**base, "CDTRAIN_WORKER_MAX_JOBS": "1"})
    assert (one.worker_max_jobs, one.worker_idle_exit) == (1, DEFAULT_ONE_JOB_IDLE_EXIT_S)
    tuned = ServiceSettings.from_env({**base, "CDTRAIN_WORKER_MAX_JOBS": "1", "CDTRAIN_WORKER_IDLE_EXIT_S": "30"})
    assert tuned.worker_idle_exit == 30
    with pytest.raises(ValueError, match="worker_max_jobs"):
        ServiceSettings.from_env({**base, "CDTRAIN_WORKER_MAX_JOBS": "0"})
