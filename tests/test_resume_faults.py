"""A worker process killed (SIGKILL) or stopped (SIGTERM) in the middle of a job, on the real services.

Workers are real ``cdtrain serve --role consumer`` processes on RabbitMQ, nx-27017 (MongoDB
protocol), moto's S3 (datasets and ``CDTRAIN_CHECKPOINT_URI``) and MLflow on a SQLite file; the
projector and its watchdog run in the test. What must hold: the job ends SUCCEEDED with one
MLflow run whose metric history has each epoch (and each step) once, the next attempt resumed
from the checkpoint, and one model version is registered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from consumer.checkpoints import CheckpointStore, StoredProgress
from consumer.roles import run_projector
from consumer.watchdog import Watchdog
from infra.bus import BusSettings
from infra.bus.rabbit import RabbitBus
from infra.objects import S3ObjectStore
from infra.views import MongoJobViewStore
from schemas import JobState, StatusEvent, TrainJob, TrainRequest
from schemas.jobs import ATTEMPT_STRIDE
from snunet_cbam.synthetic import make_synthetic_dataset
from schemas.topology import Topology
from tests.fixtures.rabbit import TEST_SETTINGS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Small enough for a CPU, long enough (about a second an epoch) to be killed in the middle.
CONFIG = {"base_channel": 4, "crop_size": 32, "batch_size": 2, "num_workers": 0, "device": "cpu", "compile": False,
          "amp": False, "window_size": 64, "window_overlap": 8, "crops_per_image": 2, "epochs": 6,
          "log_every_steps": 1, "patience": None}
# Short for the test, yet above the longest stall of a worker's event loop here (MLflow's model
# export holds the GIL for seconds on 2 busy cores).
STALE_AFTER_S = 10.0
CONSUMING = "worker consuming train requests"


@dataclass
class Service:
    env: dict[str, str]
    views: MongoJobViewStore
    bus: RabbitBus
    checkpoints: CheckpointStore
    mlflow: MlflowClient
    tmp: Path
    dataset_uri: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        env = {**self.env, "CDTRAIN_DATA_DIR": str(self.tmp / name)}
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([sys.executable, "-m", "cdtrain", "serve", "--role", "consumer"], cwd=REPO,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(process)
        return process

    async def until_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {name} never logged {text!r}:\n{self.log(name)}")
            await asyncio.sleep(0.2)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    async def submit(self, **config: Any) -> str:
        job = TrainJob(request=TrainRequest(dataset_uri=self.dataset_uri, config={**CONFIG, **config},
                                            register_model=True))
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
                raise AssertionError(f"{what} not reached in {timeout} s; view: {view}\n"
                                     + "\n".join(self.log(p) for p in ("a", "b") if (self.tmp / f"{p}.log").exists()))
            await asyncio.sleep(0.1)


@pytest.fixture
def topology(service_topology: Topology) -> Topology:
    return service_topology


@pytest.fixture
async def service(tmp_path: Path, amqp_url: str, topology: Topology, mongodb_url: str,
                  mongo_view_store: MongoJobViewStore, s3_settings: Any, s3_store: S3ObjectStore,
                  s3_bucket: str) -> AsyncIterator[Service]:
    data = make_synthetic_dataset(tmp_path / "data", pairs=12, size=64, seed=5).root
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        await s3_store.upload_file(s3_bucket, f"data/{path.relative_to(data).as_posix()}", path)
    database = mongo_view_store.collection.database.name
    env = {**os.environ,
           "CDTRAIN_BUS_URL": amqp_url, "CDTRAIN_TOPOLOGY_PREFIX": topology.prefix,
           "CDTRAIN_MONGODB_URL": mongodb_url, "CDTRAIN_MONGODB_DATABASE": database,
           "CDTRAIN_S3_ENDPOINT_URL": s3_settings.endpoint_url, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "CDTRAIN_CHECKPOINT_URI": f"s3://{s3_bucket}/checkpoints/", "CDTRAIN_CHECKPOINT_EVERY_S": "1",
           "CDTRAIN_HEARTBEAT_S": "0.5", "CDTRAIN_LOG_LEVEL": "INFO"}
    bus = RabbitBus(BusSettings(url=amqp_url, **TEST_SETTINGS), topology)
    await bus.connect()
    stop = asyncio.Event()
    watchdog = Watchdog(bus, mongo_view_store, stale_after=STALE_AFTER_S, step_stall=None, source="/test/watchdog")
    projector = asyncio.create_task(run_projector(bus, mongo_view_store, watchdog, stop, sweep_interval=0.5,
                                                  poll_interval=0.1))
    service = Service(env, mongo_view_store, bus, CheckpointStore(s3_store, s3_bucket, "checkpoints/"),
                      MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]), tmp_path, f"s3://{s3_bucket}/data/")
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


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def the_run(client: MlflowClient, job_id: str) -> Any:
    runs = client.search_runs([client.get_experiment_by_name("cdtrain").experiment_id],
                              filter_string=f"tags.job_id = '{job_id}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def assert_one_history(service: Service, job_id: str, epochs: int = CONFIG["epochs"]) -> Any:
    run = the_run(service.mlflow, job_id)
    assert metric_steps(service.mlflow, run.info.run_id, "val_f1") == list(range(1, epochs + 1))
    steps = Counter(metric_steps(service.mlflow, run.info.run_id, "step_loss"))
    assert steps and max(steps.values()) == 1, [s for s, n in steps.items() if n > 1]
    versions = service.mlflow.search_model_versions("name = 'snunet-cbam'")
    assert [v.run_id for v in versions] == [run.info.run_id]  # one version, of this job's run
    return run


async def wait_for_epoch(service: Service, job_id: str, epoch: int) -> Any:
    return await service.until_view(job_id, lambda v: v.state is JobState.RUNNING and (v.epoch or 0) >= epoch
                                    and any(h.epoch >= epoch for h in v.history), 180, f"epoch {epoch}")


async def test_a_worker_killed_mid_run_costs_at_most_an_epoch(service: Service) -> None:
    first = service.start_worker("a")
    await service.until_log("a", CONSUMING, 120)
    job_id = await service.submit()
    view = await wait_for_epoch(service, job_id, 2)
    first.send_signal(signal.SIGKILL)
    killed_at, done_epochs = time.monotonic(), max(h.epoch for h in view.history)
    first.wait(30)
    service.start_worker("b")

    resumed = await service.until_view(job_id, lambda v: v.last_sequence // ATTEMPT_STRIDE >= 1
                                       and v.state is JobState.RUNNING, 120, "the next attempt running")
    final = await service.until_view(job_id, lambda v: v.state.is_terminal, 240, "the end")
    print(f"\nSIGKILL at epoch {done_epochs}: next attempt running after {time.monotonic() - killed_at:.1f} s "
          f"(stale_after {STALE_AFTER_S:g} s); view at {resumed.state.value}")
    assert final.state is JobState.SUCCEEDED, final.error
    run = assert_one_history(service, job_id)
    # The next attempt started where the checkpoint was: no epoch the killed one completed ran again.
    assert int(run.data.tags["start_epoch"]) >= done_epochs + 1
    stored = await service.checkpoints.latest(job_id)
    assert stored.finished and stored.attempt == final.last_sequence // ATTEMPT_STRIDE >= 1
    assert "resuming attempt 0's checkpoint" in service.log("b")


async def test_a_worker_stopped_mid_run_checkpoints_and_hands_the_job_over(service: Service) -> None:
    first = service.start_worker("a")
    await service.until_log("a", CONSUMING, 120)
    job_id = await service.submit(epochs=30, crops_per_image=8)  # about 1 s an epoch: a outlives b's start
    await wait_for_epoch(service, job_id, 2)
    service.start_worker("b")
    await service.until_log("b", CONSUMING, 120)
    first.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert first.wait(60) == 0
    await service.until_view(job_id, lambda v: v.last_sequence // ATTEMPT_STRIDE >= 1 and v.state is JobState.RUNNING,
                             60, "the next attempt running")
    handed_over = time.monotonic() - stopped_at
    final = await service.until_view(job_id, lambda v: v.state.is_terminal, 240, "the end")
    print(f"\nSIGTERM: next attempt running {handed_over:.1f} s later (no watchdog wait), job done after "
          f"{time.monotonic() - stopped_at:.1f} s")
    assert final.state is JobState.SUCCEEDED, final.error
    run = assert_one_history(service, job_id, epochs=30)
    # Nothing was lost: the stop wrote a checkpoint at the step it stopped at (inside an epoch, or
    # at its end), and the next attempt began there: every step above appears once.
    checkpoints = service.checkpoints
    raw = await checkpoints.objects.get_bytes(checkpoints.bucket, f"{checkpoints.prefix}{job_id}/attempt-0/progress.json")
    stopped = StoredProgress.model_validate_json(raw)
    assert stopped.epoch >= 2 and not stopped.finished
    assert "resuming attempt 0's checkpoint" in service.log("b")
    assert f"step {stopped.global_step}" in service.log("b")
    stored = await checkpoints.latest(job_id)
    assert stored.attempt == 1 and stored.finished
    assert int(run.data.tags["start_epoch"]) == stopped.epoch + 1
