"""Nothing lost in transit: a worker's status events outlive a broker outage of any length and the
worker process itself (consumer/outbox.py, consumer/status_relay.py, docs/reliability.md)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from consumer.outbox import StatusOutbox
from consumer.roles import run_worker
from infra.backoff import RetryBackoff
from consumer.stores import StoreResolver
from consumer.worker import TrainingWorker, WorkerSettings
from infra.bus import BusSettings, MessageBus
from infra.bus.rabbit import RabbitBus
from infra.objects import LocalObjectStore
from infra.views import InMemoryJobViewStore, Projector
from schemas import JobState, StatusEvent, TrainJob, TrainRequest
from schemas.topology import Topology
from snunet_cbam.synthetic import make_synthetic_dataset
from tests.fixtures.rabbit import TEST_SETTINGS
from tests.test_bus import DroppingProxy
from tests.test_cancel import DATASET, TINY, RecordingTracker, until, view_state_of
from tests.test_ownership import Runs

ROOT = Path(__file__).resolve().parents[1]

# A worker process that records a job's events while the broker is down, then is killed (SIGKILL)
# or stops as the worker role does (its relay gives up after 0.2 s and exits).
WORKER_DURING_AN_OUTAGE = """
import asyncio, sys
from consumer.outbox import StatusOutbox
from consumer.status import JobStatusPublisher
from consumer.status_relay import StatusRelay
from infra.backoff import RetryBackoff
from infra.bus import BusUnavailable
from schemas import JobPhase, JobState, TrainJob

class BrokerDown:
    async def publish_status(self, *args, **kwargs):
        raise BusUnavailable("the connection to RabbitMQ is down (reconnecting)")

async def main(path, job_json, how):
    relay = StatusRelay(BrokerDown(), StatusOutbox(path), backoff=RetryBackoff(first_s=0.05, max_s=0.1))
    status = JobStatusPublisher(relay, TrainJob.model_validate_json(job_json), source="/test/worker",
                                settle_timeout=0.2)
    await status.publish(JobState.RUNNING, JobPhase.TRAINING, epochs=2)
    status.emit_threadsafe(JobState.RUNNING, JobPhase.TRAINING, epoch=1, metrics={"val_f1": 0.5})
    await status.heartbeat()
    await status.publish(JobState.SUCCEEDED, None, metrics={"val_f1": 0.5})
    if how == "stopped":
        await status.close()
        assert not await relay.close(timeout=0.2)
    print("recorded", flush=True)
    if how == "killed":
        await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("how", ["killed", "stopped"])
async def test_events_a_worker_left_unsent_are_sent_first_and_in_order_by_the_next_one(
        bus: MessageBus, tmp_path: Path, how: str) -> None:
    work_dir = tmp_path / "work"
    outbox_path = WorkerSettings(work_dir=work_dir).status_outbox
    job = TrainJob(request=TrainRequest(dataset_uri=DATASET))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER_DURING_AN_OUTAGE, str(outbox_path), job.model_dump_json(), how,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    assert await asyncio.wait_for(child.stdout.readline(), 60) == b"recorded\n"
    if how == "killed":
        child.kill()  # no close, no checkpoint of the write-ahead log
    assert await child.wait() == (-9 if how == "killed" else 0)
    left = StatusOutbox(outbox_path)
    unsent = [entry.event for entry in left.pending()]
    left.close()
    assert [(e.state, e.sequence) for e in unsent] == [
        (JobState.RUNNING, 1), (JobState.RUNNING, 2), (JobState.RUNNING, 3), (JobState.SUCCEEDED, 4)]

    seen: list[StatusEvent] = []

    async def collect(event: StatusEvent, _delivery: Any) -> None:
        seen.append(event)

    watcher = await bus.subscribe_status("job.#", collect, model=StatusEvent)
    worker = TrainingWorker(bus, StoreResolver(LocalObjectStore(tmp_path)), RecordingTracker(),
                            WorkerSettings(work_dir=work_dir, heartbeat_interval=0.5))
    stop = asyncio.Event()
    started = time.monotonic()
    role = asyncio.create_task(run_worker(bus, worker, stop))
    try:
        await until(lambda: len(seen) >= len(unsent), timeout=10, what="the events the first worker left")
        print(f"\n[{how}] the next worker sent the {len(unsent)} events left {time.monotonic() - started:.2f} s "
              "after it started")
    finally:
        stop.set()
        await asyncio.wait_for(role, 30)
        await watcher.close()
    assert seen == unsent  # the same events (ids, times, data), in their order
    assert seen[1].data.metrics == {"val_f1": 0.5}
    emptied = StatusOutbox(outbox_path)
    assert emptied.count() == 0
    emptied.close()


# CDTRAIN_TEST_OUTAGE_S=120 runs the 2-minute version (docs/reliability.md).
OUTAGE_S = float(os.environ.get("CDTRAIN_TEST_OUTAGE_S", "5"))  # far beyond what a bounded retry budget of short delays (0.1 + 0.2 + 0.5 + 1 s) would wait


async def test_a_job_that_ends_during_a_broker_outage_ends_succeeded_once_the_broker_is_back(
        amqp_url: str, rabbit_topology: Topology, tmp_path: Path) -> None:
    """RabbitMQ only: the worker's connection goes through a proxy that is cut while the job
    registers its model; the job ends during the outage. The projector (a direct connection)
    gets SUCCEEDED once the proxy is back; nothing runs twice."""
    from yarl import URL

    target = URL(amqp_url)
    proxy = DroppingProxy(target.host or "127.0.0.1", target.port or 5672)
    await proxy.start()
    direct = RabbitBus(BusSettings(url=amqp_url, **TEST_SETTINGS), rabbit_topology)
    cut_off = RabbitBus(BusSettings(url=str(target.with_host("127.0.0.1").with_port(proxy.port)), **TEST_SETTINGS),
                        rabbit_topology)
    views = InMemoryJobViewStore(tmp_path / "views.json")
    projector = Projector(views)
    seen: list[StatusEvent] = []

    async def project(event: StatusEvent, _delivery: Any) -> None:
        await projector.handle(event)

    async def collect(event: StatusEvent, _delivery: Any) -> None:
        seen.append(event)

    objects = tmp_path / "objects"
    make_synthetic_dataset(objects / "lake" / "data", pairs=12, size=64, seed=5)
    gate = threading.Event()
    tracker = Runs(finish_gate=gate)
    settings = WorkerSettings(work_dir=tmp_path / "work", heartbeat_interval=0.2, status_settle_s=0.5,
                              status_retry=RetryBackoff(first_s=0.1, max_s=0.5))
    stop = asyncio.Event()
    role: asyncio.Task[None] | None = None
    broker_cut = False
    try:
        await direct.connect()
        await cut_off.connect()
        await direct.consume_projector(project, model=StatusEvent)
        await direct.subscribe_status("job.#", collect, model=StatusEvent)
        worker = TrainingWorker(cut_off, StoreResolver(LocalObjectStore(objects)), tracker, settings, views=views)
        role = asyncio.create_task(run_worker(cut_off, worker, stop))
        job = TrainJob(request=TrainRequest(dataset_uri=DATASET, config={**TINY, "epochs": 1}))
        queued = StatusEvent.queued(job, source="/test/ingress")
        await direct.publish_status(queued, queued.routing_key, message_id=queued.id)
        await direct.publish_request(job, message_id=job.job_id)
        assert await asyncio.to_thread(tracker.finishing.wait, 180), "the job never reached its registration"
        await view_state_of(views, job.job_id, JobState.RUNNING)

        await proxy.outage()
        broker_cut, cut = True, time.monotonic()
        await asyncio.sleep(1.5)  # beats every 0.2 s meanwhile: the outbox keeps the newest
        gate.set()  # the job ends during the outage
        await until(lambda: worker.idle, timeout=5, what="the handler's return during the outage")
        handler_s = time.monotonic() - cut - 1.5
        backlog = await worker.relay.backlog()
        assert backlog <= 2, backlog  # SUCCEEDED, and at most the job's newest beat
        assert (await views.get(job.job_id)).state is JobState.RUNNING
        await asyncio.sleep(cut + OUTAGE_S - time.monotonic())

        await proxy.start()
        broker_cut, restored = False, time.monotonic()
        view = await view_state_of(views, job.job_id, JobState.SUCCEEDED, timeout=30)
        print(f"\nhandler returned {handler_s:.2f} s after the job's end, mid-outage ({backlog} events waiting "
              f"in the outbox); the view was SUCCEEDED {time.monotonic() - restored:.2f} s after a "
              f"{OUTAGE_S:.0f} s outage ended")
        assert tracker.started == [job.job_id] and tracker.finished == [job.job_id]
        mine = [e for e in seen if e.job_id == job.job_id]
        assert [e.sequence for e in mine] == sorted(e.sequence for e in mine)
        states = [e.data.state for e in mine]
        assert states.count(JobState.STARTING) == 1 and JobState.QUEUED not in states[1:]
        assert view.last_sequence == max(e.sequence for e in mine)
        assert await worker.relay.backlog() == 0
    finally:
        gate.set()
        stop.set()
        if broker_cut:
            await proxy.start()
        if role is not None:
            await asyncio.wait_for(role, 60)
        await cut_off.close()
        await direct.close()
        await proxy.close()
