"""A worker that takes a set number of jobs and exits: one Kubernetes Job per train request.

Workers are real ``cdtrain serve --role consumer`` processes on RabbitMQ, nx-27017 (MongoDB
protocol), moto's S3 and MLflow on a SQLite file; the projector runs in the test. What must hold:
a worker started with ``--max-jobs 1`` before two queued requests trains one, exits 0, and the
other request stays in the queue, never delivered, for the next worker to run as its first
attempt; a one-job worker that finds the queue empty exits 0 after its idle time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cdtrain.cli import main as cdtrain_main
from cdtrain.settings import DEFAULT_ONE_JOB_IDLE_EXIT_S, ServiceSettings
from infra.objects import S3ObjectStore
from infra.views import MongoJobViewStore
from schemas import JobState
from schemas.jobs import ATTEMPT_STRIDE
from schemas.topology import Topology
from tests.fixtures.worker_processes import CONSUMING, WorkerProcesses as Service, worker_processes

pytestmark = pytest.mark.slow

# A CPU job of a few seconds.
CONFIG = {"base_channel": 4, "crop_size": 32, "batch_size": 2, "num_workers": 0, "device": "cpu", "compile": False,
          "amp": False, "window_size": 64, "window_overlap": 8, "crops_per_image": 1, "epochs": 1,
          "log_every_steps": 1, "patience": None}
# A worker's start (torch and MLflow imports, the SQLite store's migrations) on 2 busy cores.
START_S = 120


@pytest.fixture
async def service(tmp_path: Path, amqp_url: str, service_topology: Topology, mongodb_url: str,
                  mongo_view_store: MongoJobViewStore, s3_settings: Any, s3_store: S3ObjectStore,
                  s3_bucket: str) -> AsyncIterator[Service]:
    async with worker_processes(tmp_path, amqp_url=amqp_url, topology=service_topology, mongodb_url=mongodb_url,
                                views=mongo_view_store, s3_settings=s3_settings, s3_store=s3_store,
                                s3_bucket=s3_bucket, config=CONFIG, pairs=6, seed=3, stale_after=60) as service:
        yield service


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
