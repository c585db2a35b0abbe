"""Cancelling a job: DELETE /train/{id}, `cdtrain cancel`, and what the worker does about it.

Every service scenario runs on the embedded parts (in-process bus, JSON-file view store) and on
the real ones (RabbitMQ, nx-27017 over the MongoDB protocol). The pieces are wired as
`cdtrain serve` wires them: the ingress app, a projector, and a worker started with
`consumer.roles.run_worker` reading (and claiming jobs in) the same view store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from cdtrain.client import cli as client_cli
from consumer.checkpoints import CheckpointStore
from consumer.roles import run_worker
from consumer.stores import StoreResolver
from consumer.worker import TrainingWorker, WorkerSettings
from infra.bus import BusSettings, Delivery, InProcessBus, MemoryBroker, MessageBus
from infra.bus.rabbit import RabbitBus
from infra.objects import LocalObjectStore
from infra.views import InMemoryJobViewStore, JobViewStore, Projector
from ingress.app import create_app
from ingress.settings import IngressSettings
from schemas import JobPhase, JobState, StatusEvent, TrainJob, TrainRequest, utc_now
from schemas.control import CANCELLED_BY_REQUEST
from schemas.topology import ALL_CANCELS, Topology, cancel_routing_key
from snunet_cbam.hooks import TrainerHooks
from snunet_cbam.synthetic import make_synthetic_dataset
from tests.fixtures.rabbit import TEST_SETTINGS, new_topology

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT = 30.0
TINY = {"base_channel": 4, "crop_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu", "compile": False,
        "amp": False, "window_size": 64, "window_overlap": 8, "crops_per_image": 1}
DATASET = "s3://lake/data/"


# --- the parts -------------------------------------------------------------------------------------
@dataclass
class Backend:
    kind: str
    views: JobViewStore
    new_bus: Callable[[], Awaitable[MessageBus]]


@pytest.fixture(params=["embedded", "real"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_parts(backend_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any, Any]:
    # Sync on purpose (as tests/fixtures/rabbit.py's bus_backend): getfixturevalue sets up the
    # real services' async fixtures only from here.
    if backend_kind == "real":
        return (request.getfixturevalue("amqp_url"), request.getfixturevalue("rabbit_topology"),
                request.getfixturevalue("mongo_view_store"))
    return ("memory://", new_topology(), InMemoryJobViewStore(tmp_path / "views.json"))


@pytest.fixture
async def backend(backend_kind: str, backend_parts: tuple[str, Any, Any]) -> AsyncIterator[Backend]:
    url, topology, views = backend_parts
    broker = MemoryBroker(topology) if backend_kind == "embedded" else None
    made: list[MessageBus] = []

    async def new_bus() -> MessageBus:
        settings = BusSettings(url=url, **TEST_SETTINGS)
        bus: MessageBus = (InProcessBus(settings, topology, broker) if broker is not None
                           else RabbitBus(settings, topology))
        await bus.connect()
        made.append(bus)
        return bus

    yield Backend(backend_kind, views, new_bus)
    await asyncio.gather(*(b.close() for b in made))


class RecordingTracker:
    """A JobTracker that trains nothing: it records whether a run was ever started."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.detached: list[str] = []

    def start_run(self, job: TrainJob, config: Any, attempt: int, dataset: Any = None) -> str:
        self.started.append(job.job_id)
        return f"run-{job.job_id}"

    def hooks(self, run_id: str) -> TrainerHooks:
        return TrainerHooks()

    def finish(self, *args: Any) -> None:
        return None

    def fail(self, run_id: str, reason: str) -> None:
        self.failed.append((run_id, reason))

    def detach(self, run_id: str) -> None:
        self.detached.append(run_id)


@dataclass
class Stack:
    backend: Backend
    http: TestClient
    bus: MessageBus
    objects: Path
    work_dir: Path
    events: list[StatusEvent] = field(default_factory=list)
    _tasks: list[tuple[asyncio.Event, asyncio.Task[None]]] = field(default_factory=list)

    @property
    def views(self) -> JobViewStore:
        return self.backend.views

    async def submit(self, epochs: int = 1, dataset: str = DATASET) -> str:
        response = await self.http.post("/train", json={"dataset_uri": dataset, "config": {**TINY, "epochs": epochs}},
                                        headers=AUTH)
        assert response.status == 202, await response.text()
        return (await response.json())["job_id"]

    async def delete(self, job_id: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        response = await self.http.delete(f"/train/{job_id}", headers=AUTH if headers is None else headers)
        return response.status, await response.json()

    async def start_worker(self, tracker: Any, *, stores: StoreResolver | None = None,
                           checkpoints: CheckpointStore | None = None, work_dir: Path | None = None,
                           stop: asyncio.Event | None = None) -> TrainingWorker:
        bus = await self.backend.new_bus()
        worker = TrainingWorker(bus, stores or StoreResolver(LocalObjectStore(self.objects)), tracker,
                                WorkerSettings(work_dir=work_dir or self.work_dir, heartbeat_interval=0.5),
                                views=self.views, checkpoints=checkpoints)
        stop = stop or asyncio.Event()
        self._tasks.append((stop, asyncio.create_task(run_worker(bus, worker, stop))))
        return worker

    def states(self, job_id: str) -> list[JobState]:
        return [e.data.state for e in self.events if e.job_id == job_id]

    def ended(self, job_id: str) -> StatusEvent | None:
        return next((e for e in self.events if e.job_id == job_id and e.data.state.is_terminal), None)

    async def close(self) -> None:
        for stop, task in self._tasks:
            stop.set()
            await asyncio.wait_for(task, 60)


@pytest.fixture
async def stack(backend: Backend, tmp_path: Path) -> AsyncIterator[Stack]:
    objects = tmp_path / "objects"
    make_synthetic_dataset(objects / "lake" / "data", pairs=12, size=64, seed=5)
    bus = await backend.new_bus()
    settings = IngressSettings(api_token=SecretStr(TOKEN), store_timeout_s=5.0, retry_after_s=1.0, instance="test")
    http = TestClient(TestServer(create_app(settings, bus, backend.views, LocalObjectStore(objects)), host="127.0.0.1"))
    await http.start_server()
    projector = Projector(backend.views)
    stack = Stack(backend, http, bus, objects, tmp_path / "work")

    async def project(event: StatusEvent, _delivery: Delivery) -> None:
        await projector.handle(event)

    async def watch(event: StatusEvent, _delivery: Delivery) -> None:
        stack.events.append(event)

    await bus.consume_projector(project, model=StatusEvent)
    await bus.subscribe_status("job.#", watch, model=StatusEvent)
    try:
        yield stack
    finally:
        await stack.close()
        await http.close()


async def until(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.05)


async def view_state(stack: Stack, job_id: str, state: JobState, timeout: float = WAIT) -> Any:
    return await view_state_of(stack.views, job_id, state, timeout)


async def view_state_of(views: JobViewStore, job_id: str, state: JobState, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        view = await views.get(job_id)
        if view is not None and view.state is state:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never reached {state.name}; view: {view}")
        await asyncio.sleep(0.05)


def event(job_id: str, sequence: int, state: str, **fields: Any) -> StatusEvent:
    return StatusEvent.for_job(job_id, sequence, state, source="/cdtrain/worker/test", **fields)


# --- the rule in the view store (rule 5 of infra/views/merge.py), on memory and MongoDB ----------
async def test_a_cancel_request_is_recorded_once_and_never_on_a_job_that_ended(view_store: JobViewStore) -> None:
    first = utc_now()
    assert await view_store.request_cancel("nobody", first, CANCELLED_BY_REQUEST) == (None, False)

    await view_store.apply(event("q1", 0, "queued", request=TrainRequest(dataset_uri=DATASET)))
    view, recorded = await view_store.request_cancel("q1", first, CANCELLED_BY_REQUEST)
    assert recorded and view.state is JobState.QUEUED and view.cancel_requested_at == first
    # Within the same millisecond too: the store, not the time, says which call recorded it.
    again, recorded_again = await view_store.request_cancel("q1", first, "another reason")
    assert not recorded_again and again.cancel_requested_at == first and again.cancel_reason == CANCELLED_BY_REQUEST  # the first one kept
    # Events never touch the request: it survives the worker's progress and its CANCELLED.
    await view_store.apply(event("q1", 1, "running", phase="training"))
    await view_store.apply(event("q1", 2, "cancelled", phase="training", error=CANCELLED_BY_REQUEST))
    view = await view_store.get("q1")
    assert view.state is JobState.CANCELLED and view.cancel_requested_at == first

    for state in ("succeeded", "failed", "cancelled"):
        job_id = f"done-{state}"
        await view_store.apply(event(job_id, 5, state))
        view, recorded = await view_store.request_cancel(job_id, first, CANCELLED_BY_REQUEST)
        assert not recorded and view.state.value == state and view.cancel_requested_at is None  # never un-terminated


def test_the_control_topology_is_declared_once_and_typed() -> None:
    topology = Topology(prefix="t")
    assert topology.control_exchange in topology.exchanges()
    queue = topology.control_queue(ALL_CANCELS, "w1")
    assert (queue.exclusive, queue.auto_delete, queue.durable) == (True, True, False)
    assert queue.bindings[0].exchange == "t.control" and queue.bindings[0].routing_key == "cancel.*"
    assert cancel_routing_key("abc") == "cancel.abc"
    with pytest.raises(ValueError):
        cancel_routing_key("a.b")


async def test_control_commands_need_no_listener_and_reach_every_worker(bus: MessageBus) -> None:
    from schemas.control import CancelCommand

    # No worker listening is normal (scaled to zero): confirmed, not refused as unroutable.
    await bus.publish_control(CancelCommand(job_id="j1"), cancel_routing_key("j1"))
    got: dict[str, list[str]] = {"a": [], "b": []}

    def collector(name: str) -> Callable[[CancelCommand, Delivery], Awaitable[None]]:
        async def collect(command: CancelCommand, _delivery: Delivery) -> None:
            got[name].append(command.job_id)
        return collect

    subs = [await bus.subscribe_control(ALL_CANCELS, collector(name), model=CancelCommand) for name in got]
    await bus.publish_control(CancelCommand(job_id="j2"), cancel_routing_key("j2"))
    await until(lambda: got["a"] and got["b"], what="both workers got the command")
    assert got == {"a": ["j2"], "b": ["j2"]}  # the command sent before they listened is gone
    for sub in subs:
        await sub.close()


# --- the HTTP answers -------------------------------------------------------------------------------
async def test_delete_answers_404_401_202_and_409_with_why(stack: Stack) -> None:
    status, body = await stack.delete("0123456789abcdef")
    assert status == 404 and body["error"] == "job 0123456789abcdef not found"

    job_id = await stack.submit()
    status, body = await stack.delete(job_id, headers={})
    assert status == 401  # the token the other /train routes need
    status, body = await stack.delete(job_id, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    assert (await stack.views.get(job_id)).cancel_requested_at is None  # a refused call records nothing

    status, body = await stack.delete(job_id)
    assert status == 202, body
    assert body["state"] == "QUEUED" and body["status_url"] == f"/train/{job_id}"
    assert "will not start" in body["message"]
    # Idempotent while it is being cancelled: 202 again, the first request's time kept.
    status, again = await stack.delete(job_id)
    assert status == 202 and again["cancel_requested_at"] == body["cancel_requested_at"]
    assert "already requested" in again["message"]
    view = (await (await stack.http.get(f"/train/{job_id}", headers=AUTH)).json())
    assert view["cancel_requested_at"] == body["cancel_requested_at"] and view["cancel_reason"] == CANCELLED_BY_REQUEST

    # Once it is CANCELLED, and for jobs that ended otherwise: 409 that says why.
    await stack.bus.publish_status(done := event(job_id, 1, "cancelled", error=CANCELLED_BY_REQUEST), done.routing_key)
    await view_state(stack, job_id, JobState.CANCELLED)
    status, body = await stack.delete(job_id)
    assert status == 409 and body["state"] == "CANCELLED"
    assert body["error"].startswith(f"job {job_id} is already cancelled (at ")

    finished = await stack.submit()
    await stack.bus.publish_status(ok := event(finished, 7, "succeeded"), ok.routing_key)
    view = await view_state(stack, finished, JobState.SUCCEEDED)
    status, body = await stack.delete(finished)
    assert status == 409 and body["state"] == "SUCCEEDED" and body["job_id"] == finished
    when = view.updated_at.strftime("%Y-%m-%d %H:%M:%SZ")
    assert body["error"] == f"job {finished} already succeeded at {when}; nothing to cancel"
    assert (await stack.views.get(finished)).state is JobState.SUCCEEDED  # untouched


async def test_cdtrain_cancel_prints_the_outcome_and_fails_on_404_and_409(stack: Stack, capsys: Any) -> None:
    environ = {"CDTRAIN_URL": str(stack.http.make_url("")).rstrip("/"), "CDTRAIN_API_TOKEN": TOKEN}

    async def cli(*argv: str) -> int:
        return await asyncio.to_thread(client_cli.main, list(argv), environ)

    job_id = await stack.submit()
    assert await cli("cancel", job_id) == 0
    assert capsys.readouterr().out.startswith(f"cancel requested: job {job_id} is queued and will not start")
    assert await cli("status", job_id) == 0
    assert "\ncancel     requested 20" in capsys.readouterr().out  # and "; not stopped yet"

    assert await cli("cancel", "ffffffffffffffff") == 2
    assert "error: job ffffffffffffffff not found" in capsys.readouterr().err

    await stack.bus.publish_status(ok := event(job_id, 3, "failed", error="boom"), ok.routing_key)
    await view_state(stack, job_id, JobState.FAILED)
    assert await cli("cancel", job_id) == 2
    err = capsys.readouterr().err
    assert f"error: job {job_id} already failed at " in err and "(boom); nothing to cancel" in err


# --- the worker ---------------------------------------------------------------------------------------
async def test_a_job_cancelled_while_queued_never_starts(stack: Stack) -> None:
    job_id = await stack.submit(epochs=50)
    status, _ = await stack.delete(job_id)  # no worker runs: the command reaches nobody
    assert status == 202
    tracker = RecordingTracker()
    started = time.monotonic()
    await stack.start_worker(tracker)
    view = await view_state(stack, job_id, JobState.CANCELLED)
    print(f"\n[{stack.backend.kind}] queued job cancelled: CANCELLED {time.monotonic() - started:.2f} s "
          "after a worker started")
    assert view.error == CANCELLED_BY_REQUEST and view.cancel_requested_at is not None
    await asyncio.sleep(0.5)  # anything the worker would still do after the CANCELLED event
    assert tracker.started == []  # no MLflow run: the trainer never started
    assert stack.states(job_id) == [JobState.QUEUED, JobState.CANCELLED]  # no STARTING, no RUNNING
    assert await stack.bus.request_backlog() == 0  # acked, not re-queued
    assert not (stack.work_dir / "runs" / job_id).exists()

    # The worker goes on with the next job.
    other = await stack.submit(dataset="s3://lake/missing/")
    await view_state(stack, other, JobState.FAILED)


class BlockingStore(LocalObjectStore):
    """A bucket whose listing never ends: the dataset is 'downloading' until the job is cancelled."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.listing = asyncio.Event()

    async def list(self, *args: Any, **kwargs: Any) -> Any:
        self.listing.set()
        await asyncio.Event().wait()


async def test_a_cancel_during_the_download_stops_the_job_before_training(stack: Stack) -> None:
    tracker, store = RecordingTracker(), BlockingStore(stack.objects)
    await stack.start_worker(tracker, stores=StoreResolver(store))
    job_id = await stack.submit(epochs=50)
    await asyncio.wait_for(store.listing.wait(), WAIT)
    await view_state(stack, job_id, JobState.STARTING)
    asked = time.monotonic()
    status, body = await stack.delete(job_id)
    assert status == 202 and body["state"] == "STARTING"
    view = await view_state(stack, job_id, JobState.CANCELLED, timeout=10)
    print(f"\n[{stack.backend.kind}] time to stop a downloading job after DELETE: {time.monotonic() - asked:.2f} s")
    assert view.phase is JobPhase.DOWNLOADING and view.error == CANCELLED_BY_REQUEST
    assert tracker.started == []
    assert JobState.RUNNING not in stack.states(job_id)


async def test_a_lost_cancel_command_is_made_up_for_by_the_view(stack: Stack) -> None:
    # A worker without a control subscription: every command is lost. It still re-reads the job's
    # view at each heartbeat (0.5 s here) and stops the job.
    store = BlockingStore(stack.objects)
    worker = TrainingWorker(await stack.backend.new_bus(), StoreResolver(store), RecordingTracker(),
                            WorkerSettings(work_dir=stack.work_dir, heartbeat_interval=0.5),
                            views=stack.views)
    consuming = await worker.bus.consume_requests(worker.handle, model=TrainJob, prefetch=1)
    try:
        job_id = await stack.submit(epochs=50)
        await asyncio.wait_for(store.listing.wait(), WAIT)
        asked = time.monotonic()
        assert (await stack.delete(job_id))[0] == 202
        view = await view_state(stack, job_id, JobState.CANCELLED, timeout=5)
        print(f"\n[{stack.backend.kind}] time to stop with the command lost (heartbeat 0.5 s): "
              f"{time.monotonic() - asked:.2f} s")
        assert view.phase is JobPhase.DOWNLOADING and view.error == CANCELLED_BY_REQUEST
    finally:
        await worker.stop()
        await consuming.close()


@pytest.mark.slow
async def test_a_running_job_stops_within_seconds_killed_not_requeued_checkpoints_kept(
        stack: Stack, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from consumer.tracking.job_tracker import MlflowJobTracker

    tracker = MlflowJobTracker(MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "cancel-tests",
                               artifact_location=(tmp_path / "artifacts").as_uri())
    await stack.start_worker(tracker)
    job_id = await stack.submit(epochs=500)
    await until(lambda: any(e.job_id == job_id and e.data.epoch == 1 and e.data.metrics for e in stack.events),
                timeout=180, what="epoch 1")

    asked = time.monotonic()
    status, body = await stack.delete(job_id)
    assert status == 202 and body["state"] == "RUNNING" and "next training step" in body["message"]
    await until(lambda: stack.ended(job_id) is not None, timeout=WAIT, what="the job's end")
    seconds = time.monotonic() - asked
    epoch_1 = next(e for e in stack.events if e.job_id == job_id and e.data.epoch == 1 and e.data.metrics)
    print(f"\n[{stack.backend.kind}] time to stop a running job after DELETE: {seconds:.2f} s "
          f"(one epoch, validation included: {epoch_1.data.metrics['epoch_seconds']:.2f} s)")

    ended = stack.ended(job_id)
    assert ended.data.state is JobState.CANCELLED and ended.data.error == CANCELLED_BY_REQUEST
    # Bounded by the rest of one training step or one validation pass (the trainer checks its
    # token between steps); on a quiet machine ~0.4 s, on the 2 shared cores under load up to ~5 s.
    assert seconds < 15
    view = await view_state(stack, job_id, JobState.CANCELLED)
    assert view.error == CANCELLED_BY_REQUEST and view.epoch >= 1
    assert tracker.client.get_run(ended.data.mlflow_run_id).info.status == "KILLED"
    await asyncio.sleep(1.0)  # a re-queue would publish QUEUED and the request by now
    states = stack.states(job_id)
    assert states[-1] is JobState.CANCELLED and JobState.QUEUED not in states[1:]
    assert await stack.bus.request_backlog() == 0
    assert (stack.work_dir / "runs" / job_id / "attempt-0" / "last.pt").is_file()


async def test_no_heartbeat_follows_the_end_of_a_job(backend: Backend) -> None:
    # A beat that raced the end would re-state CANCELLED/FAILED without its error, newer than the
    # end, and the view would lose the reason.
    from consumer.outbox import StatusOutbox
    from consumer.status import JobStatusPublisher
    from consumer.status_relay import StatusRelay

    bus = await backend.new_bus()
    seen: list[StatusEvent] = []

    async def collect(event: StatusEvent, _delivery: Delivery) -> None:
        seen.append(event)

    await bus.subscribe_status("job.#", collect, model=StatusEvent)
    relay = StatusRelay(bus, StatusOutbox.in_memory())
    status = JobStatusPublisher(relay, TrainJob(request=TrainRequest(dataset_uri=DATASET)), source="/test")
    await status.publish(JobState.CANCELLED, JobPhase.TRAINING, error=CANCELLED_BY_REQUEST)
    await status.heartbeat()
    await status.close()
    await relay.close(timeout=5)
    await until(lambda: len(seen) >= 1, what="the CANCELLED event")
    await asyncio.sleep(0.3)
    assert [(e.data.state, e.data.error) for e in seen] == [(JobState.CANCELLED, CANCELLED_BY_REQUEST)]


async def test_the_watchdog_ends_a_silent_cancelled_job_instead_of_running_it_again(backend: Backend) -> None:
    from consumer.watchdog import Watchdog

    bus, views = await backend.new_bus(), backend.views
    await views.apply(event("silent", 0, "queued", request=TrainRequest(dataset_uri=DATASET)))
    await views.apply(event("silent", 5, "running", phase="training"))
    await views.request_cancel("silent", utc_now(), CANCELLED_BY_REQUEST)  # its worker died before it heard
    await asyncio.sleep(0.05)
    assert await Watchdog(bus, views, stale_after=0.01).sweep() == ["silent"]
    projector = Projector(views)

    async def project(ev: StatusEvent, _delivery: Delivery) -> None:
        await projector.handle(ev)

    await bus.consume_projector(project, model=StatusEvent)
    view = await view_state_of(views, "silent", JobState.CANCELLED)
    assert view.error == CANCELLED_BY_REQUEST and view.phase is JobPhase.TRAINING
    assert await bus.request_backlog() == 0  # not re-queued


async def test_a_job_past_its_deadline_is_stopped_by_its_worker_and_ends_failed(stack: Stack) -> None:
    """The deadline (consumer/watchdog.py, end_overdue) stops a job through the cancel path, yet
    it ends FAILED with the deadline's reason: a queued job that a worker claims only afterwards,
    and a job being downloaded by a live worker."""
    from consumer.watchdog import Watchdog

    watchdog = Watchdog(stack.bus, stack.views, job_deadline=1.0, source="/cdtrain/watchdog/test")
    queued = await stack.submit(epochs=50)  # no worker yet
    await asyncio.sleep(1.1)
    assert await watchdog.sweep() == [queued]
    view = await view_state(stack, queued, JobState.FAILED)
    assert view.error.startswith("deadline of 1 s passed at") and "CDTRAIN_JOB_DEADLINE_S" in view.error

    # A worker that takes its request skips it (the stop is in the view): it never starts, and it
    # says nothing either (its CANCELLED would be claimed on a job that ended: refused, rule 9).
    store = BlockingStore(stack.objects)
    tracker = RecordingTracker()
    await stack.start_worker(tracker, stores=StoreResolver(store))
    deadline = time.monotonic() + 10
    while await stack.bus.request_backlog() > 0:
        assert time.monotonic() < deadline, "the request was never taken"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert stack.states(queued) == [JobState.QUEUED, JobState.FAILED] and tracker.started == []

    running = await stack.submit(epochs=50)
    await asyncio.wait_for(store.listing.wait(), WAIT)
    await view_state(stack, running, JobState.STARTING)
    await asyncio.sleep(1.1)
    asked = time.monotonic()
    assert await watchdog.sweep() == [running]
    await until(lambda: JobState.CANCELLED in stack.states(running), timeout=10, what="the worker's stop")
    print(f"\n[{stack.backend.kind}] worker stopped {time.monotonic() - asked:.2f} s after the deadline sweep")
    await asyncio.sleep(0.3)  # the worker's CANCELLED reaches the projector too
    for job_id in (queued, running):
        view = await stack.views.get(job_id)
        assert view.state is JobState.FAILED and view.error.startswith("deadline of 1 s passed at"), job_id
    assert view.phase is JobPhase.DOWNLOADING
    assert await stack.bus.request_backlog() == 0


# --- wiring -----------------------------------------------------------------------------------------------
def test_the_worker_gets_the_view_store_in_every_deployment() -> None:
    from tests.test_deploy import compose_environment, compose_services, k8s_container_env, k8s_workloads

    assert compose_environment(compose_services()["worker"])["CDTRAIN_MONGODB_URL"].startswith("mongodb://")
    assert k8s_container_env(k8s_workloads()["cdtrain-worker"])["CDTRAIN_MONGODB_URL"].startswith("mongodb://")
