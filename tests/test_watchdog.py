"""The watchdog re-queues jobs whose worker went silent, and gives up after max_attempts.

Runs on both buses (in-process and RabbitMQ) and both view stores (memory and nx-27017)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from schemas.jobs import ATTEMPT_HEADER, ATTEMPT_STRIDE
from consumer.roles import run_projector
from consumer.watchdog import Watchdog
from infra.bus import Delivery, MessageBus
from infra.views import JobViewStore, Projector
from schemas import JobState, StatusEvent, TrainJob, TrainRequest, utc_now


STALE_AFTER = 0.4


def _events(job: TrainJob, attempt: int, age: timedelta) -> list[StatusEvent]:
    when = utc_now() - age
    base = attempt * ATTEMPT_STRIDE
    queued = StatusEvent.queued(job, source="/test/ingress")
    running = StatusEvent.for_job(job.job_id, base + 2, JobState.RUNNING, source="/test/worker", phase="training",
                                  epoch=3, epochs=10, time=when)
    starting = StatusEvent.for_job(job.job_id, base + 1, JobState.STARTING, source="/test/worker",
                                   phase="downloading", time=when)
    return [queued, starting, running]


async def _collect_requests(bus: MessageBus, into: list[tuple[TrainJob, dict[str, Any]]]):
    async def handle(job: TrainJob, delivery: Delivery) -> None:
        into.append((job, dict(delivery.headers)))

    return await bus.consume_requests(handle, model=TrainJob, prefetch=5)


async def test_silent_jobs_are_requeued_then_failed_and_live_ones_left_alone(bus: MessageBus,
                                                                             view_store: JobViewStore) -> None:
    projector = Projector(view_store)
    silent = TrainJob(request=TrainRequest(dataset_uri="s3://lake/a/", register_model=True))
    alive = TrainJob(request=TrainRequest(dataset_uri="s3://lake/b/"))
    # Silence is measured from when the projector heard from a job, not from the events' times.
    for event in _events(silent, 0, timedelta(minutes=30)):
        await projector.handle(event)
    await asyncio.sleep(STALE_AFTER)
    for event in _events(alive, 0, timedelta(minutes=30)):
        await projector.handle(event)

    requeued: list[tuple[TrainJob, dict[str, Any]]] = []
    subscription = await _collect_requests(bus, requeued)
    watchdog = Watchdog(bus, view_store, stale_after=STALE_AFTER, max_attempts=2)
    status_seen: list[StatusEvent] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        status_seen.append(event)
        await projector.handle(event)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    try:
        assert await watchdog.sweep() == [silent.job_id]
        for _ in range(100):
            if requeued and status_seen:
                break
            await asyncio.sleep(0.05)
        job, headers = requeued[0]
        assert job.job_id == silent.job_id and job.request == silent.request
        assert int(headers[ATTEMPT_HEADER]) == 1
        view = await view_store.get(silent.job_id)
        assert view.state == JobState.QUEUED and view.last_sequence == ATTEMPT_STRIDE
        assert "re-queued (attempt 2)" in view.error

        # The next attempt also goes silent: with max_attempts=2 the job fails with a reason.
        for event in _events(silent, 1, timedelta(minutes=30))[1:]:
            await projector.handle(event)
        await asyncio.sleep(STALE_AFTER)
        await projector.handle(StatusEvent.for_job(alive.job_id, 3, JobState.RUNNING, source="/test/worker",
                                                   phase="training", time=utc_now() - timedelta(minutes=30)))
        assert await watchdog.sweep() == [silent.job_id]
        for _ in range(100):
            view = await view_store.get(silent.job_id)
            if view.state == JobState.FAILED:
                break
            await asyncio.sleep(0.05)
        assert view.state == JobState.FAILED and "stopped responding 2 times" in view.error
        assert len(requeued) == 1
        assert (await view_store.get(alive.job_id)).state == JobState.RUNNING
        assert await watchdog.sweep() == []
    finally:
        await watcher.close()
        await subscription.close()


class _SlowViews:
    """A view store whose writes take ``delay`` (a projector working through a backlog)."""

    def __init__(self, inner: JobViewStore, delay: float) -> None:
        self._inner, self._delay = inner, delay

    async def apply(self, event: StatusEvent, **kwargs: Any) -> bool:
        await asyncio.sleep(self._delay)
        return await self._inner.apply(event, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _ReadTogether:
    """A view store proxy whose reads wait for the other watchdog's: both judge the same views."""

    def __init__(self, inner: JobViewStore, barrier: asyncio.Barrier) -> None:
        self._inner, self._barrier = inner, barrier

    async def list(self, *args: Any, **kwargs: Any) -> Any:
        page = await self._inner.list(*args, **kwargs)
        await self._barrier.wait()
        return page

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def _until(check, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_after_a_projector_outage_the_first_sweep_waits_for_the_backlog(bus: MessageBus,
                                                                             view_store: JobViewStore) -> None:
    """The projector (and its watchdog) were down while a live job kept beating: its heartbeats
    wait in the projector queue. On restart the watchdog must not re-queue it; a job that really
    went silent is still re-queued, once, after the backlog is in."""
    stale_after = 1.0
    alive = TrainJob(request=TrainRequest(dataset_uri="s3://lake/alive/"))
    dead = TrainJob(request=TrainRequest(dataset_uri="s3://lake/dead/"))
    projector = Projector(view_store)
    for event in _events(alive, 0, timedelta(0)) + _events(dead, 0, timedelta(0)):
        await projector.handle(event)
    await asyncio.sleep(stale_after + 0.1)  # the outage: both views are now older than stale_after
    beats = [StatusEvent.for_job(alive.job_id, sequence, JobState.RUNNING, source="/test/worker",
                                 phase="training", epoch=3, epochs=10, step=sequence)
             for sequence in range(3, 33)]
    for event in beats:  # the backlog the restarted projector finds
        await bus.publish_status(event, event.routing_key, message_id=event.id)

    requeued: list[tuple[TrainJob, dict[str, Any]]] = []
    subscription = await _collect_requests(bus, requeued)
    stop, caught_up = asyncio.Event(), asyncio.Event()
    watchdog = Watchdog(bus, view_store, stale_after=stale_after, max_attempts=3)
    started = time.monotonic()
    role = asyncio.create_task(run_projector(bus, _SlowViews(view_store, 0.02), watchdog, stop,
                                             sweep_interval=0.05, caught_up=caught_up, poll_interval=0.05))
    try:
        await _until(lambda: _at_sequence(view_store, alive.job_id, 32), "the backlog to be projected")
        await asyncio.wait_for(caught_up.wait(), 5)
        assert time.monotonic() - started < 5  # measured 0.72-0.98 s: 30 events at 20 ms + 2 polls
        await _until(lambda: _state_is(view_store, dead.job_id, JobState.QUEUED), "the silent job's re-queue")
        await asyncio.sleep(0.3)  # more sweeps
        assert [job.job_id for job, _ in requeued] == [dead.job_id]
        view = await view_store.get(alive.job_id)
        assert view.state == JobState.RUNNING and view.step == 32 and view.last_sequence == 32
    finally:
        stop.set()
        await role
        await subscription.close()


async def _at_sequence(views: JobViewStore, job_id: str, sequence: int) -> bool:
    view = await views.get(job_id)
    return view is not None and view.last_sequence >= sequence


async def _state_is(views: JobViewStore, job_id: str, state: JobState) -> bool:
    view = await views.get(job_id)
    return view is not None and view.state == state


async def test_two_watchdogs_requeue_a_silent_job_once(bus: MessageBus, view_store: JobViewStore) -> None:
    """Two projector replicas judge the same silent job at the same moment: one re-queue."""
    silent = TrainJob(request=TrainRequest(dataset_uri="s3://lake/silent/"))
    projector = Projector(view_store)
    for event in _events(silent, 0, timedelta(0)):
        await projector.handle(event)
    await asyncio.sleep(STALE_AFTER)

    requeued: list[tuple[TrainJob, dict[str, Any]]] = []
    subscription = await _collect_requests(bus, requeued)
    queued_events: list[StatusEvent] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        if event.data.state == JobState.QUEUED and event.job_id == silent.job_id:
            queued_events.append(event)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    barrier = asyncio.Barrier(2)
    watchdogs = [Watchdog(bus, _ReadTogether(view_store, barrier), stale_after=STALE_AFTER, source=f"/test/w{i}")
                 for i in range(2)]
    try:
        handled = await asyncio.gather(*(w.sweep() for w in watchdogs))
        assert sorted(len(h) for h in handled) == [0, 1]
        await _until(lambda: _nonempty(requeued), "the re-queued request")
        await asyncio.sleep(0.3)  # a second request or event would have arrived by now
        assert [job.job_id for job, _ in requeued] == [silent.job_id]
        assert len(queued_events) == 1 and queued_events[0].data.sequence == ATTEMPT_STRIDE
        view = await view_store.get(silent.job_id)
        assert view.state == JobState.QUEUED and view.last_sequence == ATTEMPT_STRIDE
    finally:
        await watcher.close()
        await subscription.close()


async def _nonempty(items: list) -> bool:
    return bool(items)


async def test_a_hung_training_thread_is_requeued_though_it_keeps_beating(bus: MessageBus,
                                                                          view_store: JobViewStore) -> None:
    """Three jobs beat every 0.05 s: one whose step is stuck in training, one whose step moves, one
    evaluating (no steps there). Only the stuck one is re-queued, with the step it hung at."""
    from consumer.outbox import StatusOutbox
    from consumer.status import JobStatusPublisher
    from consumer.status_relay import StatusRelay
    from schemas import JobPhase

    step_stall = 0.6
    jobs = {name: TrainJob(request=TrainRequest(dataset_uri=f"s3://lake/{name}/")) for name in ("hung", "moving", "eval")}
    publishers = {}
    for name, job in jobs.items():
        queued = StatusEvent.queued(job, source="/test/ingress")
        await bus.publish_status(queued, queued.routing_key, message_id=queued.id)
        publishers[name] = JobStatusPublisher(StatusRelay(bus, StatusOutbox.in_memory()), job, source="/test/worker")
    await publishers["hung"].publish(JobState.RUNNING, JobPhase.TRAINING, epoch=1, epochs=5, step=7)
    await publishers["moving"].publish(JobState.RUNNING, JobPhase.TRAINING, epoch=1, epochs=5, step=1)
    await publishers["eval"].publish(JobState.RUNNING, JobPhase.EVALUATING, epoch=5, epochs=5, step=50)

    requeued: list[tuple[TrainJob, dict[str, Any]]] = []
    subscription = await _collect_requests(bus, requeued)
    stop = asyncio.Event()
    watchdog = Watchdog(bus, view_store, stale_after=30, step_stall=step_stall)
    role = asyncio.create_task(run_projector(bus, view_store, watchdog, stop, sweep_interval=0.05,
                                             poll_interval=0.05))
    seen_steps: list[int | None] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        if event.job_id == jobs["hung"].job_id and event.source == "/test/worker":
            seen_steps.append(event.data.step)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    try:
        for beat in range(int(3 * step_stall / 0.05)):
            publishers["moving"].note(step=2 + beat)  # as StatusHooks does after every step
            for publisher in publishers.values():
                await publisher.heartbeat()
            await asyncio.sleep(0.05)
        await _until(lambda: _state_is(view_store, jobs["hung"].job_id, JobState.QUEUED), "the re-queue")
        assert [job.job_id for job, _ in requeued] == [jobs["hung"].job_id]
        view = await view_store.get(jobs["hung"].job_id)
        assert f"no training step for {step_stall:g} s (at step 7)" in view.error
        assert seen_steps and set(seen_steps) == {7}  # its heartbeats carried the step, and kept coming
        for name in ("moving", "eval"):
            assert (await view_store.get(jobs[name].job_id)).state == JobState.RUNNING, name
    finally:
        stop.set()
        await role
        await watcher.close()
        for publisher in publishers.values():
            await publisher.close()
        await subscription.close()


async def test_a_job_past_its_deadline_fails_and_its_worker_is_told_to_stop(bus: MessageBus,
                                                                           view_store: JobViewStore) -> None:
    """Running (its own deadline_s) and queued (the server default) jobs past their deadlines end
    FAILED with a reason naming the fix; the stop reaches the worker as a command and in the view;
    the worker's CANCELLED that follows does not change the outcome; two watchdogs end it once."""
    from consumer.cancellation import cancel_reason
    from schemas.control import CancelCommand
    from schemas.topology import ALL_CANCELS

    now = utc_now()
    running = TrainJob(request=TrainRequest(dataset_uri="s3://lake/r/", deadline_s=60),
                       submitted_at=now - timedelta(seconds=61))
    queued = TrainJob(request=TrainRequest(dataset_uri="s3://lake/q/"), submitted_at=now - timedelta(seconds=3))
    young = TrainJob(request=TrainRequest(dataset_uri="s3://lake/y/", deadline_s=60), submitted_at=now)
    projector = Projector(view_store)
    for job in (running, young):
        for event in _events(job, 0, timedelta(0)):  # beating: not silent
            await projector.handle(event)
    await projector.handle(StatusEvent.queued(queued, source="/test/ingress"))

    commands: list[CancelCommand] = []

    async def on_command(command: CancelCommand, _delivery: Any) -> None:
        commands.append(command)

    control = await bus.subscribe_control(ALL_CANCELS, on_command, model=CancelCommand)
    failed: list[StatusEvent] = []

    async def on_status(event: StatusEvent, _delivery: Any) -> None:
        if event.data.state == JobState.FAILED:
            failed.append(event)

    watcher = await bus.subscribe_status("job.#", on_status, model=StatusEvent)
    barrier = asyncio.Barrier(2)
    watchdogs = [Watchdog(bus, _ReadTogether(view_store, barrier), stale_after=600, job_deadline=2.0,
                          source=f"/test/w{i}") for i in range(2)]
    try:
        handled = await asyncio.gather(*(w.sweep() for w in watchdogs))
        assert sorted(handled[0] + handled[1]) == sorted([running.job_id, queued.job_id])
        await _until(lambda: _has(commands, 2), "the stop commands")
        await asyncio.sleep(0.3)  # duplicates would have arrived by now
        assert sorted(c.job_id for c in commands) == sorted([running.job_id, queued.job_id])
        assert sorted(e.job_id for e in failed) == sorted([running.job_id, queued.job_id])

        view = await view_store.get(running.job_id)
        passed = (running.submitted_at + timedelta(seconds=60)).strftime("%Y-%m-%d %H:%M:%SZ")
        assert view.state == JobState.FAILED and view.error.startswith(f"deadline of 60 s passed at {passed}")
        assert "larger deadline_s" in view.error and view.cancel_reason == view.error
        # The command was lost? The worker reads the stop from the view at its next heartbeat,
        # and a worker that claims the queued one skips it.
        assert cancel_reason(await view_store.get(running.job_id)) == view.error
        assert "CDTRAIN_JOB_DEADLINE_S" in cancel_reason(await view_store.get(queued.job_id))
        # The worker stops and says CANCELLED (its attempt's numbers): the job stays FAILED.
        stopped = StatusEvent.for_job(running.job_id, 3, JobState.CANCELLED, source="/test/worker",
                                      phase="training", error=view.error)
        assert not await projector.handle(stopped)
        assert (await view_store.get(running.job_id)).state == JobState.FAILED
        assert (await view_store.get(young.job_id)).state == JobState.RUNNING
        assert cancel_reason(await view_store.get(young.job_id)) is None
    finally:
        await watcher.close()
        await control.close()


async def _has(items: list, count: int) -> bool:
    return len(items) >= count


def test_the_watchdog_settings_come_from_the_environment(tmp_path) -> None:
    from cdtrain.settings import ServiceSettings
    from schemas.jobs import DEFAULT_DEADLINE_S

    env = {"CDTRAIN_DATA_DIR": str(tmp_path)}
    default = ServiceSettings.from_env(env)
    # A lost worker costs minutes: found after 6 silent heartbeats plus at most one sweep.
    assert (default.heartbeat_interval, default.stale_after, default.watchdog_interval) == (20, 120, 30)
    assert (default.step_stall, default.job_deadline) == (1800, DEFAULT_DEADLINE_S)
    assert default.checkpoints_at == str(tmp_path / "checkpoints") and default.checkpoint_every_s == 600
    assert default.accept_grace == 60 and ServiceSettings.from_env({**env, "CDTRAIN_ACCEPT_GRACE_S": "5"}).accept_grace == 5
    custom = ServiceSettings.from_env({**env, "CDTRAIN_STALE_AFTER_S": "15", "CDTRAIN_STEP_STALL_S": "90",
                                       "CDTRAIN_JOB_DEADLINE_S": "3600", "CDTRAIN_WATCHDOG_INTERVAL_S": "5",
                                       "CDTRAIN_CHECKPOINT_URI": "s3://ckpt/jobs/", "CDTRAIN_CHECKPOINT_EVERY_S": "60"})
    assert (custom.stale_after, custom.step_stall, custom.job_deadline, custom.watchdog_interval) == (15, 90, 3600, 5)
    assert (custom.checkpoints_at, custom.checkpoint_every_s) == ("s3://ckpt/jobs/", 60)


async def test_a_queued_job_whose_request_never_reached_the_queue_is_published_again(
        bus: MessageBus, view_store: JobViewStore) -> None:
    """An ingress that died between creating the view and its publish (or a lost confirm): the
    view is QUEUED without a recorded confirm (rule 11). After the grace the watchdog publishes
    the request, once; a job whose confirm is recorded waits in the queue untouched."""
    lost = TrainJob(request=TrainRequest(dataset_uri="s3://lake/lost/"))
    waiting = TrainJob(request=TrainRequest(dataset_uri="s3://lake/waiting/"))
    for job in (lost, waiting):
        assert await view_store.create(StatusEvent.queued(job, source="/test/ingress"))
    assert await view_store.mark_accepted(waiting.job_id, 0)  # its request is in the queue (not here)
    watchdog = Watchdog(bus, view_store, accept_grace=0.0, source="/test/watchdog")
    await asyncio.sleep(0.01)
    assert await watchdog.sweep() == [lost.job_id]
    assert await watchdog.sweep() == []  # recorded: not published twice
    assert (await view_store.get(lost.job_id)).accepted_attempt == 0
    got: list[tuple[TrainJob, int]] = []

    async def take(job: TrainJob, delivery: Delivery) -> None:
        got.append((job, int(delivery.headers.get(ATTEMPT_HEADER, -1))))

    subscription = await bus.consume_requests(take, model=TrainJob)
    try:
        await _until(lambda: _has(got, 1), "the request")
        await asyncio.sleep(0.2)
        assert [(job.job_id, attempt) for job, attempt in got] == [(lost.job_id, 0)]
        assert got[0][0].request == lost.request
        # The embedded mode after a restart: its queue was in memory, so every queued job goes again.
        assert sorted(await watchdog.republish_unconfirmed(every_queued=True)) == sorted([lost.job_id, waiting.job_id])
    finally:
        await subscription.close()


async def test_a_young_unconfirmed_job_is_left_to_its_submitter(bus: MessageBus, view_store: JobViewStore) -> None:
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/young/"))
    assert await view_store.create(StatusEvent.queued(job, source="/test/ingress"))
    assert await Watchdog(bus, view_store, accept_grace=60.0).sweep() == []
    assert await bus.request_backlog() == 0
