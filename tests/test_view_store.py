"""Job view stores: the same scenarios on the in-memory store and on MongoDB (nx-27017 or $MONGODB_URL)."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pymongo.errors import DuplicateKeyError

from infra.views import InMemoryJobViewStore, InvalidCursor, JobViewStore, MongoJobViewStore, Projector, open_view_store
from infra.views.list_order import LIST_KEY, encode_cursor, list_key
from schemas import JobPhase, JobState, StatusEvent, TrainJob, TrainRequest, event_source

WORKER = event_source("worker", "gpu-0")
DECISION = "F1 0.8123 on this job's validation split beats production v3's 0.7931 on the same data"
INGRESS = event_source("ingress", "api-0")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def queued(job_id: str, *, at: datetime = T0, key: str | None = None, sequence: int = 0) -> StatusEvent:
    request = TrainRequest(dataset_uri=f"s3://datasets/{job_id}.zip", idempotency_key=key, config={"epochs": 3})
    return StatusEvent.queued(TrainJob(job_id=job_id, request=request, submitted_at=at), source=INGRESS, sequence=sequence)


def lifecycle(job_id: str, at: datetime = T0) -> list[StatusEvent]:
    """A 3-epoch job that follows the publishing conventions (known facts repeated), in order."""
    run = "run-1"
    tick = iter(range(1, 100))

    def ev(seq: int, state: str, **kw: object) -> StatusEvent:
        return StatusEvent.for_job(job_id, seq, state, source=WORKER, time=at + timedelta(seconds=next(tick)), **kw)

    events = [queued(job_id, at=at), ev(1, "starting", phase="downloading", mlflow_run_id=run)]
    seq = 2
    for epoch in (1, 2, 3):
        common = {"epoch": epoch, "epochs": 3, "mlflow_run_id": run}
        events.append(ev(seq, "running", phase="training", step=epoch * 10 - 5, **common))
        events.append(ev(seq + 1, "running", phase="training", step=epoch * 10,
                         metrics={"val_f1": 0.5 + epoch / 10, "loss": 1.0 / epoch}, **common))
        seq += 2
    events.append(ev(seq, "running", phase="registering", epoch=3, epochs=3, step=30, mlflow_run_id=run))
    events.append(ev(seq + 1, "succeeded", epoch=3, epochs=3, step=30, mlflow_run_id=run,
                     metrics={"val_f1": 0.8, "test_f1": 0.79}, model_version="4", model_alias="candidate",
                     model_decision=DECISION))
    return events


def comparable(view) -> dict:
    dump = view.model_dump()
    dump.pop("job_id")
    # When the projector heard from the job and saw it move (rules 6 and 8): the writer's clock,
    # the only fields that are not a function of the set of events.
    dump.pop("heard_at")
    dump.pop("step_at")
    dump["request"].pop("dataset_uri")
    return dump


# --- basics ------------------------------------------------------------------------------------------------


async def test_get_unknown_is_none(view_store: JobViewStore) -> None:
    assert await view_store.get("nope") is None


async def test_queued_creates_the_view(view_store: JobViewStore) -> None:
    event = queued("job-1", key="k-1")
    assert await view_store.apply(event) is True
    view = await view_store.get("job-1")
    assert view is not None
    assert view.state is JobState.QUEUED
    assert view.request == event.data.request
    assert view.submitted_at == T0
    assert view.updated_at == T0
    assert view.source == "api"
    assert view.model_name == "snunet-cbam"
    assert view.last_sequence == 0
    assert view.history == []


async def test_full_lifecycle_in_order(view_store: JobViewStore) -> None:
    events = lifecycle("job-1")
    assert [await view_store.apply(e) for e in events] == [True] * len(events)
    view = await view_store.get("job-1")
    assert view.state is JobState.SUCCEEDED
    assert view.phase is None
    assert view.last_sequence == events[-1].sequence
    assert view.updated_at == events[-1].time
    assert (view.epoch, view.epochs, view.step) == (3, 3, 30)
    assert view.mlflow_run_id == "run-1"
    assert (view.model_version, view.model_alias, view.model_decision) == ("4", "candidate", DECISION)
    assert view.best_metrics == {"val_f1": 0.8, "test_f1": 0.79}
    assert view.metrics == view.best_metrics
    assert view.error is None
    assert [h.epoch for h in view.history] == [1, 2, 3]
    assert view.history[1].metrics == {"val_f1": pytest.approx(0.7), "loss": 0.5}
    assert view.history[0].time == events[3].time
    assert view.submitted_at == T0


async def test_running_metrics_are_latest_and_phase_follows_newest_event(view_store: JobViewStore) -> None:
    events = lifecycle("job-1")
    for e in events[:4]:  # up to epoch 1's summary
        await view_store.apply(e)
    view = await view_store.get("job-1")
    assert view.state is JobState.RUNNING
    assert view.phase is JobPhase.TRAINING
    assert view.metrics == {"val_f1": pytest.approx(0.6), "loss": 1.0}
    assert view.best_metrics is None
    await view_store.apply(events[4])  # epoch 2 progress event without metrics
    view = await view_store.get("job-1")
    assert view.metrics == {"val_f1": pytest.approx(0.6), "loss": 1.0}  # kept
    assert view.epoch == 2 and view.step == 15


async def test_failed_sets_error(view_store: JobViewStore) -> None:
    await view_store.apply(queued("job-1"))
    await view_store.apply(StatusEvent.for_job("job-1", 1, "failed", source=WORKER, error="CUDA out of memory"))
    view = await view_store.get("job-1")
    assert view.state is JobState.FAILED and view.state.is_terminal
    assert view.error == "CUDA out of memory"


# --- ordering and idempotency --------------------------------------------------------------------------------


async def test_duplicate_is_ignored(view_store: JobViewStore) -> None:
    events = lifecycle("job-1")[:4]
    for e in events:
        await view_store.apply(e)
    before = await view_store.get("job-1")
    for e in events:
        assert await view_store.apply(e) is False
    assert await view_store.get("job-1") == before


async def test_view_never_goes_backward(view_store: JobViewStore) -> None:
    await view_store.apply(queued("job-1"))
    late = StatusEvent.for_job("job-1", 3, "running", source=WORKER, phase="training", epoch=1, step=7)
    assert await view_store.apply(late) is True
    earlier = StatusEvent.for_job("job-1", 2, "starting", source=WORKER, phase="downloading", epoch=0, step=0)
    assert await view_store.apply(earlier) is False
    view = await view_store.get("job-1")
    assert view.state is JobState.RUNNING
    assert view.phase is JobPhase.TRAINING
    assert (view.last_sequence, view.epoch, view.step) == (3, 1, 7)
    # Same sequence, different content: the first one projected stays.
    rival = StatusEvent.for_job("job-1", 3, "failed", source=WORKER, error="rival")
    assert await view_store.apply(rival) is False
    assert (await view_store.get("job-1")).state is JobState.RUNNING


async def test_stale_running_after_terminal_is_ignored(view_store: JobViewStore) -> None:
    await view_store.apply(queued("job-1"))
    await view_store.apply(StatusEvent.for_job("job-1", 5, "failed", source=WORKER, error="disk full"))
    assert await view_store.apply(StatusEvent.for_job("job-1", 4, "running", source=WORKER, epoch=2)) is False
    view = await view_store.get("job-1")
    assert (view.state, view.error, view.epoch) == (JobState.FAILED, "disk full", None)


async def test_the_model_decision_survives_a_later_event_without_it(view_store: JobViewStore) -> None:
    # A heartbeat re-stating SUCCEEDED carries no decision: the view keeps the one it has.
    events = lifecycle("job-1")
    for event in events:
        await view_store.apply(event)
    restated = StatusEvent.for_job("job-1", events[-1].sequence + 1, "succeeded", source=WORKER, model_version="4")
    assert await view_store.apply(restated) is True
    view = await view_store.get("job-1")
    assert (view.model_version, view.model_alias, view.model_decision) == ("4", "candidate", DECISION)


async def test_higher_sequence_after_terminal_wins(view_store: JobViewStore) -> None:
    # Documented policy: sequence order is authoritative, so a retried attempt that continues
    # the sequence is shown (and its error cleared) rather than hidden behind the old FAILED.
    await view_store.apply(queued("job-1"))
    await view_store.apply(StatusEvent.for_job("job-1", 5, "failed", source=WORKER, error="preempted"))
    assert await view_store.apply(StatusEvent.for_job("job-1", 6, "running", source=WORKER, epoch=1)) is True
    view = await view_store.get("job-1")
    assert (view.state, view.error, view.epoch) == (JobState.RUNNING, None, 1)


async def test_late_queued_fills_the_request(view_store: JobViewStore) -> None:
    await view_store.apply(StatusEvent.for_job("job-0", 1, "starting", source=WORKER, time=T0))
    neighbour = await view_store.get("job-0")  # also lacks a request: must stay so
    starting = StatusEvent.for_job("job-1", 1, "starting", source=WORKER, phase="downloading", time=T0 + timedelta(seconds=9))
    assert await view_store.apply(starting) is True
    view = await view_store.get("job-1")
    assert view.request is None
    assert view.submitted_at == T0 + timedelta(seconds=9)  # stand-in until QUEUED is seen

    event = queued("job-1", key="k-late")
    assert await view_store.apply(event) is False  # stale: it does not move the view back...
    view = await view_store.get("job-1")
    assert view.state is JobState.STARTING and view.last_sequence == 1
    assert view.request == event.data.request  # ...but the submission is kept
    assert view.submitted_at == T0
    assert view.source == "api"
    assert view.model_name == "snunet-cbam"
    assert (await view_store.find_by_idempotency_key("k-late")).job_id == "job-1"
    assert await view_store.apply(event) is False  # and a second copy changes nothing
    assert await view_store.get("job-1") == view
    assert await view_store.get("job-0") == neighbour


async def test_late_epoch_summary_still_lands_in_history(view_store: JobViewStore) -> None:
    for e in lifecycle("job-0", at=T0 - timedelta(hours=1))[:5]:  # a neighbour the merges must not touch
        await view_store.apply(e)
    neighbour = await view_store.get("job-0")
    events = lifecycle("job-1")
    epoch2_summary = events[5]
    assert (epoch2_summary.data.epoch, epoch2_summary.data.metrics is not None) == (2, True)
    for e in events[:5] + events[6:9]:  # epoch 3 is summarised before epoch 2's summary arrives
        await view_store.apply(e)
    assert [h.epoch for h in (await view_store.get("job-1")).history] == [1, 3]
    assert await view_store.apply(epoch2_summary) is False
    view = await view_store.get("job-1")
    assert [h.epoch for h in view.history] == [1, 2, 3]
    assert view.history[1].metrics == epoch2_summary.data.metrics
    assert view.epoch == 3 and view.last_sequence == events[8].sequence
    assert await view_store.get("job-0") == neighbour


async def test_older_epoch_report_does_not_replace_newer_history_entry(view_store: JobViewStore) -> None:
    newer = StatusEvent.for_job("job-1", 7, "running", source=WORKER, epoch=2, metrics={"val_f1": 0.9})
    older = StatusEvent.for_job("job-1", 6, "running", source=WORKER, epoch=2, metrics={"val_f1": 0.1})
    await view_store.apply(newer)
    await view_store.apply(older)
    assert (await view_store.get("job-1")).history[0].metrics == {"val_f1": 0.9}


async def test_any_arrival_order_converges(view_store: JobViewStore) -> None:
    reference = lifecycle("ref")
    for e in reference:
        await view_store.apply(e)
    expected = comparable(await view_store.get("ref"))
    for seed in range(5):
        events = lifecycle(f"job-{seed}")
        random.Random(seed).shuffle(events)
        for e in events:
            await view_store.apply(e)
        assert comparable(await view_store.get(f"job-{seed}")) == expected, f"order seed {seed}"


async def test_concurrent_applies_converge(view_store: JobViewStore) -> None:
    reference = lifecycle("ref")
    for e in reference:
        await view_store.apply(e)
    expected = comparable(await view_store.get("ref"))

    events = lifecycle("job-c")

    async def deliver(seed: int) -> list[bool]:
        mine = list(events)
        random.Random(seed).shuffle(mine)
        return [await view_store.apply(e) for e in mine]

    results = await asyncio.gather(*(deliver(seed) for seed in range(8)))
    view = await view_store.get("job-c")
    assert comparable(view) == expected
    # Every delivery of the newest event either applied it or found it applied; overall no more
    # advances than events, and at least one (the first write of the view).
    advanced = sum(sum(r) for r in results)
    assert 1 <= advanced <= len(events)


async def test_projector_counts(view_store: JobViewStore) -> None:
    projector = Projector(view_store)
    events = lifecycle("job-1")[:3]
    for e in events + events:
        await projector.handle(e)
    assert (projector.applied, projector.ignored) == (3, 3)
    assert (await view_store.get("job-1")).last_sequence == 2


# --- listing ------------------------------------------------------------------------------------------------


async def _seed_jobs(store: JobViewStore) -> list[str]:
    """Nine jobs; pairs share a submitted_at so the job-id tie-break matters. Newest first order returned."""
    ids = []
    for i in range(9):
        job_id = f"job-{i}"
        await store.apply(queued(job_id, at=T0 + timedelta(seconds=i // 2)))
        if i % 3 == 0:
            await store.apply(StatusEvent.for_job(job_id, 1, "running", source=WORKER, epoch=1))
        ids.append(job_id)
    return sorted(ids, key=lambda j: (T0 + timedelta(seconds=int(j[4:]) // 2), j), reverse=True)


async def test_list_newest_first_with_pages(view_store: JobViewStore) -> None:
    expected = await _seed_jobs(view_store)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = await view_store.list(limit=4, cursor=cursor)
        assert len(page) <= 4
        seen += [v.job_id for v in page]
        pages += 1
        if cursor is None:
            break
    assert seen == expected
    assert pages == 3
    everything, cursor = await view_store.list(limit=9)
    assert [v.job_id for v in everything] == expected and cursor is None


async def test_list_exact_page_has_no_next_cursor(view_store: JobViewStore) -> None:
    await _seed_jobs(view_store)
    page, cursor = await view_store.list(limit=8)
    assert len(page) == 8 and cursor is not None
    last, cursor = await view_store.list(limit=8, cursor=cursor)
    assert len(last) == 1 and cursor is None


async def test_list_filters_by_state(view_store: JobViewStore) -> None:
    expected = await _seed_jobs(view_store)
    running = [j for j in expected if int(j[4:]) % 3 == 0]
    page, cursor = await view_store.list(limit=2, state=JobState.RUNNING)
    rest, end = await view_store.list(limit=2, cursor=cursor, state="RUNNING")
    assert [v.job_id for v in page + rest] == running
    assert end is None
    assert all(v.state is JobState.RUNNING for v in page + rest)
    queued_only, _ = await view_store.list(limit=50, state="queued")
    assert [v.job_id for v in queued_only] == [j for j in expected if j not in running]
    assert await view_store.list(state=JobState.SUCCEEDED) == ([], None)


async def test_list_empty_and_bad_arguments(view_store: JobViewStore) -> None:
    assert await view_store.list() == ([], None)
    with pytest.raises(InvalidCursor):
        await view_store.list(cursor="not-a-cursor")
    with pytest.raises(ValueError, match="limit"):
        await view_store.list(limit=0)
    with pytest.raises(ValueError, match="limit"):
        await view_store.list(limit=1001)
    with pytest.raises(ValueError):
        await view_store.list(state="paused")


async def _seed_ties(store: JobViewStore) -> list[tuple[str, str]]:
    """36 jobs in groups of three that share a submitted_at, groups 250 ms apart (four in one
    second), ids not in time order, states mixed. ``(job_id, state)`` newest first."""
    jobs = []
    for i in range(36):
        job_id = f"job-{(i * 17) % 36:02d}"
        at = T0 + timedelta(milliseconds=250 * (i // 3))
        await store.apply(queued(job_id, at=at))
        state = ("failed", "running", "queued", "queued")[i % 4]
        if state != "queued":
            await store.apply(StatusEvent.for_job(job_id, 1, state, source=WORKER, time=at + timedelta(seconds=5)))
        jobs.append((at, job_id, state))
    return [(job_id, state) for _, job_id, state in sorted(jobs, reverse=True)]


async def _every_page(store: JobViewStore, limit: int, state: str | None = None) -> list[tuple[list[str], str | None]]:
    pages, cursor = [], None
    while len(pages) < 100:
        page, cursor = await store.list(limit=limit, cursor=cursor, state=state)
        pages.append(([v.job_id for v in page], cursor))
        if cursor is None:
            break
    return pages


@pytest.mark.parametrize(("state", "limit"), [(None, 5), (None, 1), ("failed", 2), ("queued", 4)])
async def test_cursors_give_every_view_once_in_order(view_store: JobViewStore, state: str | None, limit: int) -> None:
    expected = [job_id for job_id, s in await _seed_ties(view_store) if state is None or s == state]
    pages = await _every_page(view_store, limit, state)
    seen = [job_id for ids, _ in pages for job_id in ids]
    assert seen == expected  # each exactly once, newest first, ties by job id descending
    assert all(len(ids) == limit for ids, _ in pages[:-1]) and 0 < len(pages[-1][0]) <= limit


async def test_both_backends_give_the_same_pages_and_cursors(mongo_view_store: MongoJobViewStore) -> None:
    memory = InMemoryJobViewStore()
    await _seed_ties(memory)
    await _seed_ties(mongo_view_store)
    for limit, state in [(7, None), (3, "running")]:
        assert await _every_page(mongo_view_store, limit, state) == await _every_page(memory, limit, state)


async def test_a_late_queued_moves_the_job_to_its_place_in_the_list(view_store: JobViewStore) -> None:
    # Created from its STARTING event, the view stands at that event's time until the QUEUED
    # event, projected late, brings the real submitted_at: the list position follows.
    await view_store.apply(queued("first", at=T0 + timedelta(seconds=1)))
    await view_store.apply(queued("third", at=T0 + timedelta(seconds=3)))
    assert await view_store.claim(StatusEvent.for_job("second", 1, "starting", source=WORKER,
                                                      time=T0 + timedelta(seconds=10)))
    assert [ids for ids, _ in await _every_page(view_store, 1)] == [["second"], ["third"], ["first"]]
    assert not await view_store.apply(queued("second", at=T0 + timedelta(seconds=2)))
    assert [ids for ids, _ in await _every_page(view_store, 1)] == [["third"], ["second"], ["first"]]
    page, _ = await view_store.list(limit=1, cursor=encode_cursor(list_key(T0 + timedelta(seconds=3), "third")))
    assert [v.job_id for v in page] == ["second"]


async def test_cursors_of_the_earlier_form_still_work(view_store: JobViewStore) -> None:
    expected = [job_id for job_id, _ in await _seed_ties(view_store)]
    first, cursor = await view_store.list(limit=5)
    raw = json.dumps({"t": first[-1].submitted_at.isoformat(), "j": first[-1].job_id}, separators=(",", ":"))
    old_form = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")  # the earlier form
    assert old_form != cursor
    assert await view_store.list(limit=5, cursor=old_form) == await view_store.list(limit=5, cursor=cursor)
    assert [v.job_id for v in (await view_store.list(limit=5, cursor=old_form))[0]] == expected[5:10]


def _b64(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    "not-a-cursor", "!!", _b64({"k": "2025-03-01T12:00:00.000Z|job-1"}), _b64({"k": "20250301T120000.000Z"}),
    _b64({"k": 5}), _b64({"t": "yesterday", "j": "job-1"}), _b64({"t": "2025-03-01T12:00:00", "j": "job-1"}),
    _b64(["k"]),
])
async def test_a_cursor_it_did_not_produce_is_refused(view_store: JobViewStore, cursor: str) -> None:
    await _seed_ties(view_store)
    with pytest.raises(InvalidCursor, match="invalid cursor"):
        await view_store.list(cursor=cursor)


# --- idempotency ---------------------------------------------------------------------------------------------


async def test_find_by_idempotency_key(view_store: JobViewStore) -> None:
    await view_store.apply(queued("job-a", key="upload-1", at=T0))
    await view_store.apply(queued("job-b", key="upload-2", at=T0 + timedelta(seconds=1)))
    await view_store.apply(queued("job-c", key="upload-1", at=T0 + timedelta(seconds=2)))
    await view_store.apply(queued("job-d", at=T0 + timedelta(seconds=3)))
    assert (await view_store.find_by_idempotency_key("upload-2")).job_id == "job-b"
    assert (await view_store.find_by_idempotency_key("upload-1")).job_id == "job-c"  # the newest
    assert await view_store.find_by_idempotency_key("upload-3") is None


# --- backend specifics -----------------------------------------------------------------------------------------


async def test_memory_store_persists_to_json(tmp_path: Path) -> None:
    path = tmp_path / "views" / "jobs.json"
    store = InMemoryJobViewStore(path)
    events = lifecycle("job-1")
    for e in events:
        await store.apply(e)
    await store.close()
    reopened = InMemoryJobViewStore(path)
    assert await reopened.get("job-1") == await store.get("job-1")
    assert await reopened.apply(events[3]) is False  # positions survive the restart
    assert not path.with_name("jobs.json.tmp").exists()


def test_open_view_store_picks_backend(tmp_path: Path) -> None:
    assert isinstance(open_view_store(None), InMemoryJobViewStore)
    assert isinstance(open_view_store("memory://"), InMemoryJobViewStore)
    assert isinstance(open_view_store(f"file://{tmp_path}/v.json"), InMemoryJobViewStore)
    assert isinstance(open_view_store("mongodb://127.0.0.1:1/x"), MongoJobViewStore)
    with pytest.raises(ValueError, match="unsupported view store URL"):
        open_view_store("redis://localhost")


async def test_mongo_ensure_indexes_is_idempotent_and_covers_queries(mongo_view_store: MongoJobViewStore) -> None:
    await mongo_view_store.ensure_indexes()
    await mongo_view_store.ensure_indexes()
    # Compare key fields only: nx-27017 names (and reports directions of) indexes its own way.
    keys = [list(ix["key"].keys()) async for ix in await mongo_view_store.collection.list_indexes()]
    assert [LIST_KEY] in keys
    assert ["state", LIST_KEY] in keys
    assert ["request.idempotency_key"] in keys


async def test_mongo_views_written_without_the_list_key_list_after_ensure_indexes(
    mongo_view_store: MongoJobViewStore,
) -> None:
    """Views from before the list key existed: the same documents, without the field."""
    seeded = await _seed_ties(mongo_view_store)
    expected = [job_id for job_id, _ in seeded]
    collection = mongo_view_store.collection
    docs = await collection.find({}).to_list()
    await collection.delete_many({})
    # Every other view the old way; the rest as this release writes them.
    await collection.insert_many([{k: v for k, v in d.items() if k != LIST_KEY or i % 2} for i, d in enumerate(docs)])
    assert await collection.count_documents({LIST_KEY: {"$exists": False}}) == 18
    assert [j for ids, _ in await _every_page(mongo_view_store, 5) for j in ids] != expected  # what it fixes

    await mongo_view_store.ensure_indexes()
    assert await collection.count_documents({LIST_KEY: {"$exists": False}}) == 0
    assert [j for ids, _ in await _every_page(mongo_view_store, 5) for j in ids] == expected
    failed = [j for ids, _ in await _every_page(mongo_view_store, 2, "failed") for j in ids]
    assert failed == [job_id for job_id, state in seeded if state == "failed"]
    # The backfilled keys are the ones this release writes; a second run changes nothing.
    keys = {d["_id"]: d[LIST_KEY] async for d in collection.find({}, {LIST_KEY: 1})}
    assert keys == {d["_id"]: d[LIST_KEY] for d in docs}
    await mongo_view_store.ensure_indexes()
    assert {d["_id"]: d[LIST_KEY] async for d in collection.find({}, {LIST_KEY: 1})} == keys


class _RecordsFinds:
    """A real collection that records the filter, sort and limit of each find."""

    def __init__(self, collection) -> None:
        self._collection = collection
        self.finds: list[dict] = []

    def __getattr__(self, name: str):
        return getattr(self._collection, name)

    def find(self, filter=None, *args, **kwargs):
        record = {"filter": filter}
        self.finds.append(record)
        return _RecordedCursor(self._collection.find(filter, *args, **kwargs), record)


class _RecordedCursor:
    def __init__(self, cursor, record: dict) -> None:
        self._cursor, self._record = cursor, record

    def sort(self, spec):
        self._record["sort"] = spec
        self._cursor = self._cursor.sort(spec)
        return self

    def limit(self, n: int):
        self._record["limit"] = n
        self._cursor = self._cursor.limit(n)
        return self

    async def to_list(self, *args):
        return await self._cursor.to_list(*args)


def _operators(node: object) -> set[str]:
    if isinstance(node, dict):
        return {k for k in node if k.startswith("$")} | {op for v in node.values() for op in _operators(v)}
    if isinstance(node, list):
        return {op for v in node for op in _operators(v)}
    return set()


def _served_from_the_list_index(explain: dict, collection: str) -> bool:
    """MongoDB: an IXSCAN of an index on list_key and no COLLSCAN. nx-27017: SQLite's plan rows,
    a SEARCH using the list_key index and no SCAN of the collection's table."""
    plan = json.dumps(explain["queryPlanner"]["winningPlan"], default=str)
    if "IXSCAN" in plan or "COLLSCAN" in plan:
        return "IXSCAN" in plan and "COLLSCAN" not in plan and LIST_KEY in plan
    rows = [row.get("detail", "") for row in explain["queryPlanner"]["winningPlan"]]
    return (any("USING INDEX" in r and LIST_KEY in r for r in rows)
            and not any(r.split(" ")[:2] == ["SCAN", collection] for r in rows))


@pytest.mark.parametrize("state", [None, "failed"])
async def test_mongo_deep_pages_are_one_indexed_range(mongo_view_store: MongoJobViewStore, state: str | None) -> None:
    await _seed_ties(mongo_view_store)
    recording = _RecordsFinds(mongo_view_store.collection)
    store = MongoJobViewStore(recording)  # type: ignore[arg-type]
    first, cursor = await store.list(limit=2, state=state)
    deeper, _ = await store.list(limit=2, cursor=cursor, state=state)
    assert len(deeper) == 2 and len(recording.finds) == 2
    deep = recording.finds[-1]
    # The query shape: one range on the list key (and the state), sorted by that key, no $or.
    assert _operators(deep["filter"]) == {"$lt"}
    after = list_key(first[-1].submitted_at, first[-1].job_id)
    assert deep["filter"] == {LIST_KEY: {"$lt": after}, **({"state": state} if state else {})}
    assert [(field, direction) for field, direction in deep["sort"]] == [(LIST_KEY, -1)]
    # And the server serves it from the index (nx-27017 explains its SQLite plan; MongoDB its own).
    explain = await mongo_view_store.collection.find(deep["filter"]).sort(deep["sort"]).limit(deep["limit"]).explain()
    assert _served_from_the_list_index(explain, mongo_view_store.collection.name), explain


async def test_mongo_two_projector_processes_converge(mongodb_url: str, mongo_view_store: MongoJobViewStore) -> None:
    """Two clients (as two projector replicas) racing on the same jobs, views created concurrently."""
    database = mongo_view_store.collection.database.name
    other = MongoJobViewStore.connect(mongodb_url, database=database)
    try:
        reference = lifecycle("ref")
        for e in reference:
            await mongo_view_store.apply(e)
        expected = comparable(await mongo_view_store.get("ref"))

        async def deliver(store: MongoJobViewStore, job_id: str, seed: int) -> None:
            events = lifecycle(job_id)
            random.Random(seed).shuffle(events)
            for e in events:
                await store.apply(e)

        jobs = [f"job-{i}" for i in range(4)]
        await asyncio.gather(
            *(deliver(store, job, seed) for job in jobs for seed, store in enumerate([mongo_view_store, other] * 2))
        )
        for job in jobs:
            assert comparable(await other.get(job)) == expected, job
        assert await mongo_view_store.collection.count_documents({}) == len(jobs) + 1
    finally:
        await other.close()


class _LosesCreationRace:
    """A real collection whose first upsert loses the creation race to a competing projector.

    On a real mongod two projectors can both miss the filter of a new job and both insert; the
    loser gets E11000 although its event may be the newer one. nx-27017 serializes writes, so
    the interleaving is injected here: the competitor's write lands, then the duplicate key error.
    """

    def __init__(self, collection, competitor: StatusEvent) -> None:
        self._collection = collection
        self._competitor = competitor
        self.raced = False

    def __getattr__(self, name: str):
        return getattr(self._collection, name)

    async def update_one(self, filter, update, upsert: bool = False, **kwargs):
        if upsert and not self.raced:
            self.raced = True
            await MongoJobViewStore(self._collection).apply(self._competitor)
            raise DuplicateKeyError("E11000 duplicate key error collection: jobs index: _id_ (injected race)", 11000)
        return await self._collection.update_one(filter, update, upsert=upsert, **kwargs)


@pytest.mark.parametrize(("ours", "theirs", "advanced"), [(5, 3, True), (3, 5, False)])
async def test_mongo_lost_creation_race_is_resolved(
    mongo_view_store: MongoJobViewStore, ours: int, theirs: int, advanced: bool
) -> None:
    competitor = StatusEvent.for_job("job-r", theirs, "starting", source=WORKER, phase="downloading")
    racing = _LosesCreationRace(mongo_view_store.collection, competitor)
    store = MongoJobViewStore(racing)  # type: ignore[arg-type]
    event = StatusEvent.for_job("job-r", ours, "running", source=WORKER, phase="training", epoch=1)
    assert await store.apply(event) is advanced
    assert racing.raced
    view = await mongo_view_store.get("job-r")
    assert view.last_sequence == max(ours, theirs)
    assert view.state is (JobState.RUNNING if advanced else JobState.STARTING)


# --- liveness and compare-and-set (rules 6 and 7) ----------------------------------------------------------


async def test_heard_at_is_when_the_event_was_projected_not_its_time(view_store: JobViewStore) -> None:
    events = lifecycle("heard")  # event times in 2025
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)  # views keep milliseconds
    await view_store.apply(events[0])
    await view_store.apply(events[1])
    first = await view_store.get("heard")
    assert first.updated_at == events[1].time and before <= first.heard_at <= datetime.now(timezone.utc)
    await asyncio.sleep(0.01)
    assert not await view_store.apply(events[1])  # a duplicate is no news from the job
    assert (await view_store.get("heard")).heard_at == first.heard_at
    await view_store.apply(events[2])
    assert (await view_store.get("heard")).heard_at > first.heard_at


async def test_compare_and_set_advances_only_the_view_it_read(view_store: JobViewStore) -> None:
    events = lifecycle("cas")
    for e in events[:3]:
        await view_store.apply(e)
    requeue = StatusEvent.for_job("cas", 1000, "queued", source=WORKER, error="re-queued")
    assert not await view_store.apply(requeue, expect_sequence=1)  # the job spoke since it was read
    assert not await view_store.apply(StatusEvent.for_job("unknown", 1000, "queued", source=WORKER),
                                      expect_sequence=0)
    assert await view_store.get("unknown") is None  # never an upsert
    assert (await view_store.get("cas")).last_sequence == 2
    results = await asyncio.gather(view_store.apply(requeue, expect_sequence=2),
                                   view_store.apply(requeue, expect_sequence=2))
    assert sorted(results) == [False, True]
    view = await view_store.get("cas")
    assert view.state == JobState.QUEUED and view.last_sequence == 1000 and view.request is not None
    assert view.error == "re-queued" and view.step == 5  # sticky progress kept


async def test_step_at_moves_with_state_phase_and_step_not_with_heartbeats(view_store: JobViewStore) -> None:
    def ev(seq: int, state: str, **kw: object) -> StatusEvent:
        return StatusEvent.for_job("steps", seq, state, source=WORKER, time=T0, **kw)

    async def step_at_after(event: StatusEvent) -> datetime:
        await asyncio.sleep(0.005)  # views keep milliseconds: every write gets its own time
        assert await view_store.apply(event)
        return (await view_store.get("steps")).step_at

    starting = await step_at_after(ev(1, "starting", phase="downloading"))
    assert starting is not None
    assert await step_at_after(ev(2, "starting", phase="downloading")) == starting  # a heartbeat
    training = await step_at_after(ev(3, "running", phase="training"))  # the phase moved
    assert training > starting
    assert await step_at_after(ev(4, "running", phase="training")) == training  # no step yet
    step_10 = await step_at_after(ev(5, "running", phase="training", step=10))
    assert step_10 > training
    assert await step_at_after(ev(6, "running", phase="training", step=10)) == step_10  # hung at 10
    assert await step_at_after(ev(7, "running", phase="training")) == step_10  # no step: repeats 10
    assert await step_at_after(ev(8, "running", phase="training", step=11)) > step_10
    # The compare-and-set of the watchdog follows the same rule.
    moved = StatusEvent.for_job("steps", 1000, "queued", source=WORKER, time=T0)
    await asyncio.sleep(0.005)
    assert await view_store.apply(moved, expect_sequence=8)
    assert (await view_store.get("steps")).step_at > step_10


async def test_a_claim_is_a_lease_for_one_attempt(view_store: JobViewStore) -> None:
    def starting(attempt: int) -> StatusEvent:
        return StatusEvent.for_job("lease", attempt * 1_000_000 + 1, "starting", source=WORKER,
                                   phase="downloading", time=T0)

    await view_store.apply(queued("lease"))
    assert await view_store.claim(starting(0))
    view = await view_store.get("lease")
    assert view.state == JobState.STARTING and view.request is not None and view.step_at is not None
    assert not await view_store.claim(starting(0))  # the same attempt delivered twice: one owner
    # The watchdog re-queued it as attempt 2: a late delivery of attempt 1 no longer gets it.
    await view_store.apply(StatusEvent.for_job("lease", 2_000_000, "queued", source=WORKER, time=T0))
    assert not await view_store.claim(starting(1))
    assert await view_store.claim(starting(2))
    assert (await view_store.get("lease")).last_sequence == 2_000_001


async def test_a_claim_never_reopens_a_finished_job(view_store: JobViewStore) -> None:
    for event in lifecycle("ended"):
        await view_store.apply(event)
    assert not await view_store.claim(StatusEvent.for_job("ended", 1_000_001, "starting", source=WORKER, time=T0))
    view = await view_store.get("ended")
    assert view.state == JobState.SUCCEEDED and view.model_version == "4"


async def test_a_claim_creates_a_view_the_projector_has_not_made_yet(view_store: JobViewStore) -> None:
    # The QUEUED event still waits in the projector's queue: the claim must not wait for it,
    # and the late QUEUED still brings the request.
    assert await view_store.claim(StatusEvent.for_job("early", 1, "starting", source=WORKER, time=T0))
    assert not await view_store.apply(queued("early"))
    view = await view_store.get("early")
    assert view.state == JobState.STARTING and view.request is not None


async def test_concurrent_claims_of_one_attempt_have_one_winner(view_store: JobViewStore) -> None:
    event = StatusEvent.for_job("race", 1, "starting", source=WORKER, time=T0)
    results = await asyncio.gather(*(view_store.claim(event) for _ in range(4)))
    assert sorted(results) == [False, False, False, True]


async def test_a_job_is_created_once_and_its_confirm_only_moves_forward(view_store: JobViewStore) -> None:
    results = await asyncio.gather(*(view_store.create(queued("once")) for _ in range(4)))
    assert sorted(results) == [False, False, False, True]  # two replicas: one starts the job (rule 10)
    view = await view_store.get("once")
    assert view.state == JobState.QUEUED and view.request is not None and view.accepted_attempt is None
    assert await view_store.mark_accepted("once", 0)
    assert not await view_store.mark_accepted("once", 0)  # rule 11: only raised
    assert await view_store.mark_accepted("once", 2) and not await view_store.mark_accepted("once", 1)
    assert (await view_store.get("once")).accepted_attempt == 2
    assert not await view_store.mark_accepted("nobody", 0)
    # Events never touch it, and a created view projects on like any other.
    for event in lifecycle("once")[1:]:
        await view_store.apply(event)
    view = await view_store.get("once")
    assert view.state == JobState.SUCCEEDED and view.accepted_attempt == 2


async def test_a_store_that_guesses_a_move_wrongly_still_keeps_step_at(mongo_view_store: MongoJobViewStore) -> None:
    """The Mongo store tries the rule-8 filter that its own last write for the job suggests; when
    another writer has moved the view since, the guess is wrong and must cost a round trip only."""
    this, other = mongo_view_store, MongoJobViewStore(mongo_view_store.collection)

    def ev(seq: int, state: str, **kw: object) -> StatusEvent:
        return StatusEvent.for_job("guess", seq, state, source=WORKER, time=T0, **kw)

    async def step_at() -> datetime:
        return (await this.get("guess")).step_at

    assert await this.apply(ev(1, "running", phase="training", step=10))
    await asyncio.sleep(0.005)
    assert await other.apply(ev(2, "running", phase="training", step=11))  # moved by the other writer
    moved_at = await step_at()
    await asyncio.sleep(0.005)
    assert await this.apply(ev(3, "running", phase="training", step=11))  # guesses a move: there is none
    assert await step_at() == moved_at
    await asyncio.sleep(0.005)
    assert await other.apply(ev(4, "queued"))  # phase None: the null case of the filters
    queued_at = await step_at()
    assert queued_at > moved_at
    await asyncio.sleep(0.005)
    assert await this.apply(ev(5, "queued"))
    assert await step_at() == queued_at
    await asyncio.sleep(0.005)
    assert await other.apply(ev(6, "running", phase="training", step=3))  # resumed from an earlier step
    resumed_at = await step_at()
    await asyncio.sleep(0.005)
    assert await this.apply(ev(7, "running", phase="training", step=4))  # a real move, guessed as one
    assert await step_at() > resumed_at
    view = await this.get("guess")
    assert (view.last_sequence, view.state, view.step) == (7, JobState.RUNNING, 4)


async def test_many_confirms_are_recorded_in_one_call_by_rule_11(view_store: JobViewStore) -> None:
    for job_id in ("a", "b", "c", "d"):
        await view_store.apply(queued(job_id))
    assert await view_store.mark_accepted("c", 3)
    assert await view_store.mark_accepted_many({"a": 0, "b": 1, "c": 2, "d": 0, "nobody": 0}) == 3
    attempts = {job_id: (await view_store.get(job_id)).accepted_attempt for job_id in "abcd"}
    assert attempts == {"a": 0, "b": 1, "c": 3, "d": 0}  # c keeps its newer record
    assert await view_store.get("nobody") is None  # never created by a record
    assert await view_store.mark_accepted_many({"a": 0, "b": 0}) == 0  # only raised
    assert await view_store.mark_accepted_many({}) == 0
