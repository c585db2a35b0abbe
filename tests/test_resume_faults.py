"""A worker process killed (SIGKILL) or stopped (SIGTERM) in the middle of a job, on the real services.

Workers are real ``cdtrain serve --role consumer`` processes on RabbitMQ, nx-27017 (MongoDB
protocol), moto's S3 (datasets and ``CDTRAIN_CHECKPOINT_URI``) and MLflow on a SQLite file; the
projector and its watchdog run in the test. What must hold: the job ends SUCCEEDED with one
MLflow run whose metric history has each epoch (and each step) once, the next attempt resumed
from the checkpoint, and one model version is registered.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from consumer.checkpoints import CheckpointStore, StoredProgress
from infra.objects import S3ObjectStore
from infra.views import MongoJobViewStore
from schemas import JobState
from schemas.jobs import ATTEMPT_STRIDE
from schemas.topology import Topology
from tests.fixtures.worker_processes import CONSUMING, WorkerProcesses, worker_processes

pytestmark = pytest.mark.slow

# Small enough for a CPU, long enough (about a second an epoch) to be killed in the middle.
CONFIG = {"base_channel": 4, "crop_size": 32, "batch_size": 2, "num_workers": 0, "device": "cpu", "compile": False,
          "amp": False, "window_size": 64, "window_overlap": 8, "crops_per_image": 2, "epochs": 6,
          "log_every_steps": 1, "patience": None}
# Short for the test, yet above the longest stall of a worker's event loop here (MLflow's model
# export holds the GIL for seconds on 2 busy cores).
STALE_AFTER_S = 10.0


@dataclass
class Service:
    """The worker processes, and where a job's checkpoints and MLflow runs land."""

    processes: WorkerProcesses
    checkpoints: CheckpointStore
    mlflow: MlflowClient

    def __getattr__(self, name: str) -> Any:  # start_worker, submit, until_view, log ...
        return getattr(self.processes, name)


@pytest.fixture
async def service(tmp_path: Path, amqp_url: str, service_topology: Topology, mongodb_url: str,
                  mongo_view_store: MongoJobViewStore, s3_settings: Any, s3_store: S3ObjectStore,
                  s3_bucket: str) -> AsyncIterator[Service]:
    async with worker_processes(tmp_path, amqp_url=amqp_url, topology=service_topology, mongodb_url=mongodb_url,
                                views=mongo_view_store, s3_settings=s3_settings, s3_store=s3_store,
                                s3_bucket=s3_bucket, config=CONFIG, pairs=12, seed=5, stale_after=STALE_AFTER_S,
                                register_model=True,
                                env={"CDTRAIN_CHECKPOINT_EVERY_S": "1", "CDTRAIN_HEARTBEAT_S": "0.5"}) as processes:
        yield Service(processes, CheckpointStore(s3_store, s3_bucket, "checkpoints/"),
                      MlflowClient(tracking_uri=processes.env["MLFLOW_TRACKING_URI"]))


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
