"""One owner per job, and stops that lose nothing: claims (rule 9 of infra/views/merge.py), superseded
attempts, and a worker shutdown during the fetch or the registration.

Each scenario runs on the embedded parts and on the real ones (RabbitMQ, nx-27017), with real
training of a tiny model, through the stack of tests/test_cancel.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from consumer.checkpoints import CheckpointStore
from consumer.stores import StoreResolver
from infra.bus import BusUnavailable
from infra.objects import LocalObjectStore
from ingress.app import create_app
from ingress.settings import IngressSettings
from schemas import JobState, StatusEvent, TrainJob
from schemas.jobs import ATTEMPT_HEADER, ATTEMPT_STRIDE, new_job_id
from snunet_cbam.hooks import RunStartInfo, TrainerHooks
from tests.test_cancel import (  # noqa: F401 - fixtures
    AUTH,
    DATASET,
    TINY,
    TOKEN,
    WAIT,
    BlockingStore,
    RecordingTracker,
    Stack,
    backend,
    backend_kind,
    backend_parts,
    stack,
    until,
    view_state,
)


class Runs(RecordingTracker):
    """Records what each attempt's trainer started from, and which jobs were finished (registered)."""

    def __init__(self, finish_gate: threading.Event | None = None) -> None:
        super().__init__()
        self.starts: list[RunStartInfo] = []
        self.finished: list[str] = []
        self.finishing = threading.Event()
        self.finish_gate = finish_gate

    def hooks(self, run_id: str) -> TrainerHooks:
        runs = self

        class Record(TrainerHooks):
            def on_run_start(self, info: RunStartInfo) -> None:
                runs.starts.append(info)

        return Record()

    def finish(self, run_id: str, result: Any, job: TrainJob, *args: Any) -> None:
        self.finishing.set()
        if self.finish_gate is not None:
            self.finish_gate.wait(WAIT)
        self.finished.append(job.job_id)


async def job_of(stack: Stack, job_id: str) -> TrainJob:
    view = await stack.views.get(job_id)
    return TrainJob(job_id=job_id, request=view.request, submitted_at=view.submitted_at)


async def test_a_request_delivered_twice_is_trained_once_and_a_finished_job_never_again(stack: Stack) -> None:
    tracker = Runs()
    await stack.start_worker(tracker)
    await stack.start_worker(tracker, work_dir=stack.work_dir / "second")
    job_id = await stack.submit(epochs=2)
    job = await job_of(stack, job_id)
    # A replica's or a redelivery's copy of attempt 0: both workers take one.
    await stack.bus.publish_request(job, message_id=job_id, headers={ATTEMPT_HEADER: 0})
    await view_state(stack, job_id, JobState.SUCCEEDED, timeout=60)
    # The finished job delivered again, as a later attempt (a late watchdog re-queue, say).
    await stack.bus.publish_request(job, message_id=job_id, headers={ATTEMPT_HEADER: 4})
    await asyncio.sleep(1.5)  # both copies were handled by now (one worker is idle)
    assert tracker.started == [job_id] and tracker.finished == [job_id]
    assert stack.states(job_id).count(JobState.STARTING) == 1
    view = await stack.views.get(job_id)
    assert view.state is JobState.SUCCEEDED and view.last_sequence < ATTEMPT_STRIDE


async def test_a_superseded_attempt_stops_without_registering_and_the_next_one_resumes(
        stack: Stack, tmp_path: Path) -> None:
    checkpoints = CheckpointStore(LocalObjectStore(tmp_path / "store"), "checkpoints", "jobs/")
    await checkpoints.check()
    tracker = Runs()
    await stack.start_worker(tracker, checkpoints=checkpoints)
    job_id = await stack.submit(epochs=40)
    await until(lambda: any(e.job_id == job_id and (e.data.epoch or 0) >= 2 and e.data.metrics
                            for e in stack.events), timeout=60, what="epoch 2")

    # The watchdog judged attempt 0 lost (its compare-and-set), and re-queued the job as attempt 1.
    requeue = StatusEvent.for_job(job_id, ATTEMPT_STRIDE, "queued", source="/test/watchdog",
                                  error="re-queued (attempt 2): its worker went silent")
    # The running attempt keeps writing: as the watchdog does, read again when its write lost.
    for _ in range(100):
        view = await stack.views.get(job_id)
        if await stack.views.apply(requeue, expect_sequence=view.last_sequence):
            break
    else:
        raise AssertionError("the re-queue's compare-and-set lost to the running attempt 100 times")
    superseded_at = time.monotonic()
    await stack.start_worker(tracker, checkpoints=checkpoints, work_dir=stack.work_dir / "second")
    await stack.bus.publish_request(await job_of(stack, job_id), message_id=job_id, headers={ATTEMPT_HEADER: 1})

    final = await view_state(stack, job_id, JobState.SUCCEEDED, timeout=120)
    print(f"\n[{stack.backend.kind}] superseded → succeeded in {time.monotonic() - superseded_at:.1f} s")
    assert tracker.finished == [job_id]  # the superseded attempt registered nothing...
    assert tracker.detached == [f"run-{job_id}"] and tracker.failed == []  # ...nor ended the shared run
    first, second = tracker.starts
    assert first.start_step == 0
    # The second attempt started from the first one's checkpoint: at least the 2 epochs it had done.
    assert second.start_step >= 2 * first.steps_per_epoch and len(second.history) >= 2
    assert final.last_sequence // ATTEMPT_STRIDE == 1
    stored = await checkpoints.latest(job_id)
    assert stored is not None and stored.attempt == 1 and stored.finished


async def test_a_worker_stopped_during_the_download_re_queues_the_job(stack: Stack) -> None:
    store, stop_first = BlockingStore(stack.objects), asyncio.Event()
    first = Runs()
    await stack.start_worker(first, stores=StoreResolver(store), stop=stop_first)
    job_id = await stack.submit(epochs=1)
    await asyncio.wait_for(store.listing.wait(), WAIT)
    stop_first.set()  # SIGTERM: the role's stop
    requeued = await view_state(stack, job_id, JobState.QUEUED)
    assert requeued.error == "re-queued: the worker shut down" and first.started == []
    second = Runs()
    await stack.start_worker(second, work_dir=stack.work_dir / "second")
    await view_state(stack, job_id, JobState.SUCCEEDED, timeout=60)
    assert second.finished == [job_id] and JobState.FAILED not in stack.states(job_id)


async def test_a_worker_stopped_during_the_registration_finishes_it_and_nothing_runs_again(stack: Stack) -> None:
    gate, stop = threading.Event(), asyncio.Event()
    tracker = Runs(finish_gate=gate)
    await stack.start_worker(tracker, stop=stop)
    job_id = await stack.submit(epochs=1)
    await asyncio.to_thread(tracker.finishing.wait, WAIT)
    stop.set()  # SIGTERM while the model is being registered
    await asyncio.sleep(1.0)
    assert (await stack.views.get(job_id)).state is JobState.RUNNING  # still registering, not re-queued
    gate.set()
    await view_state(stack, job_id, JobState.SUCCEEDED)
    await asyncio.sleep(0.5)
    states = stack.states(job_id)
    assert tracker.finished == [job_id] and states.count(JobState.QUEUED) == 1 and states[-1] is JobState.SUCCEEDED


class ConfirmLostBus:
    """The broker stores the next request, but its confirm never reaches the publisher."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.lose_next = inner, True

    async def publish_request(self, *args: Any, **kwargs: Any) -> str:
        message_id = await self.inner.publish_request(*args, **kwargs)
        if self.lose_next:
            self.lose_next = False
            raise BusUnavailable("publisher confirm timed out", retry_after=0.05)
        return message_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_request_whose_confirm_was_lost_is_not_accepted_and_never_runs(stack: Stack) -> None:
    """The client is told "not accepted, submit it again", and that is true: the copy the broker
    kept reaches a worker, whose claim refuses the ended job. The retry (same key) runs once."""
    settings = IngressSettings(api_token=SecretStr(TOKEN), store_timeout_s=5.0, retry_after_s=1.0, instance="lost")
    app = create_app(settings, ConfirmLostBus(stack.bus), stack.views, LocalObjectStore(stack.objects))
    http = TestClient(TestServer(app, host="127.0.0.1"))
    await http.start_server()
    try:
        body = {"dataset_uri": DATASET, "config": {**TINY, "epochs": 1}, "idempotency_key": "lost-confirm"}
        response = await http.post("/train", json=body, headers=AUTH)
        assert response.status == 503 and "was not accepted" in (await response.json())["error"]
        job_id = new_job_id("lost-confirm")
        assert (await stack.views.get(job_id)).error.startswith("not accepted")
        assert await stack.bus.request_backlog() == 1  # the broker has it all the same

        tracker = Runs()
        await stack.start_worker(tracker)
        deadline = time.monotonic() + WAIT
        while await stack.bus.request_backlog() > 0:
            assert time.monotonic() < deadline, "the copy was never taken"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert tracker.started == [] and JobState.STARTING not in stack.states(job_id)

        retry = await http.post("/train", json=body, headers=AUTH)
        assert retry.status == 202 and (await retry.json())["job_id"] == job_id
        await view_state(stack, job_id, JobState.SUCCEEDED, timeout=60)
        assert tracker.started == [job_id] and tracker.finished == [job_id]
    finally:
        await http.close()
