"""The status outbox (consumer/outbox.py) and its relay (consumer/status_relay.py) on their own:
order across a reopen, removal only after the broker's confirm, heartbeat coalescing, torn writes,
one owner per outbox. What an append costs is measured by bench/outbox_append.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from consumer.outbox import OutboxInUse, StatusOutbox
from consumer.status import JobStatusPublisher
from consumer.status_relay import StatusRelay
from infra.backoff import RetryBackoff
from infra.bus import BusUnavailable
from schemas import JobPhase, JobState, StatusEvent, TrainJob, TrainRequest

ROOT = Path(__file__).resolve().parents[1]
FAST = RetryBackoff(first_s=0.01, max_s=0.05)


def event(job_id: str, sequence: int, state: str = "running", **fields) -> StatusEvent:
    return StatusEvent.for_job(job_id, sequence, state, source="/test/worker", **fields)


class GatedBus:
    """The one call a relay makes, with a broker that is down (``refusing``) or slow to confirm
    (``confirming`` cleared), and a record of what it confirmed."""

    def __init__(self) -> None:
        self.refusing = False
        self.confirming = asyncio.Event()
        self.confirming.set()
        self.attempts = 0
        self.confirmed: list[StatusEvent] = []

    async def publish_status(self, payload: StatusEvent, routing_key: str, *, message_id: str | None = None,
                             **_: object) -> str:
        self.attempts += 1
        if self.refusing:
            raise BusUnavailable("the connection to RabbitMQ is down (reconnecting)")
        await self.confirming.wait()
        assert message_id == payload.id and routing_key == payload.routing_key
        self.confirmed.append(payload)
        return payload.id


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# --- the outbox on disk ---------------------------------------------------------------------------
def test_events_come_back_in_append_order_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = StatusOutbox(path)
    appended = [event("a", 1, "starting"), event("b", 1, "starting"), event("a", 2, epoch=1, metrics={"f1": 0.5}),
                event("b", 2), event("a", 3, "succeeded")]
    ids = [outbox.append(e) for e in appended]
    outbox.remove(ids[-1])  # the newest, confirmed: its id is never given out again
    outbox.close()

    reopened = StatusOutbox(path)
    pending = reopened.pending()
    assert [entry.id for entry in pending] == ids[:-1] == sorted(ids[:-1])
    assert [entry.event for entry in pending] == appended[:-1]  # whole events: id, time, data
    assert reopened.append(event("c", 1)) > ids[-1]
    reopened.close()


def test_a_job_s_unsent_heartbeat_is_replaced_by_its_newest(tmp_path: Path) -> None:
    outbox = StatusOutbox(tmp_path / "outbox.sqlite3")
    outbox.append(event("a", 1), heartbeat=True)
    outbox.append(event("a", 2, epoch=1, metrics={"f1": 0.5}))  # an epoch's metrics: history, kept
    for sequence in range(3, 1003):  # a long outage's worth of beats
        outbox.append(event("a", sequence, step=sequence), heartbeat=True)
        outbox.append(event("b", sequence), heartbeat=True)
    outbox.append(event("a", 1003, "succeeded"))
    pending = [(e.event.job_id, e.event.sequence) for e in outbox.pending()]
    assert pending == [("a", 2), ("a", 1002), ("b", 1002), ("a", 1003)]
    database, wal = (tmp_path / name for name in ("outbox.sqlite3", "outbox.sqlite3-wal"))
    print(f"\noutbox after 2,000 beats of 2 jobs: {outbox.count()} events; database {database.stat().st_size / 1024:.0f}"
          f" KiB, write-ahead log {wal.stat().st_size / 1024:.0f} KiB (reused after SQLite's checkpoint at 1,000 pages)")
    outbox.close()


def _child(path: Path, script: str) -> None:
    """Run ``script`` in a process of its own that ends with os._exit: no close, no checkpoint of
    the WAL, as a killed worker leaves it."""
    prelude = textwrap.dedent(f"""
        import os
        from consumer.outbox import StatusOutbox
        from schemas import StatusEvent
        outbox = StatusOutbox({str(path)!r})
        def event(sequence):
            return StatusEvent.for_job("job", sequence, "running", source="/test/worker", step=sequence)
    """)
    subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script) + "\nos._exit(0)\n"],
                   cwd=ROOT, check=True, timeout=60)


def test_a_torn_or_unfinished_write_never_yields_a_partial_event(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    # A process that died in the middle of an append: its transaction never committed.
    _child(path, """
        for sequence in (1, 2, 3):
            outbox.append(event(sequence))
        outbox._db.execute("BEGIN IMMEDIATE")
        outbox._db.execute("INSERT INTO status_outbox (job_id, heartbeat, body) VALUES ('job', 0, '{\\"specv')")
    """)
    outbox = StatusOutbox(path)
    assert [e.event.sequence for e in outbox.pending()] == [1, 2, 3]
    outbox.close()

    # A write torn on its way to the disk: the last append's frames in the write-ahead log cut short.
    torn = tmp_path / "torn.sqlite3"
    _child(torn, """
        for sequence in (1, 2, 3, 4):
            outbox.append(event(sequence))
    """)
    wal = torn.with_name(torn.name + "-wal")
    assert wal.stat().st_size > 0, "the child's appends should still be in the write-ahead log"
    with wal.open("r+b") as f:
        f.truncate(wal.stat().st_size - 100)
    outbox = StatusOutbox(torn)
    pending = outbox.pending()
    assert [e.event.sequence for e in pending] == [1, 2, 3]  # the torn append is gone whole
    assert all(e.event.data.step == e.event.sequence for e in pending)
    outbox.close()


def test_one_worker_at_a_time_uses_an_outbox(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    first = StatusOutbox(path)
    with pytest.raises(OutboxInUse, match="in use by another worker"):
        StatusOutbox(path)
    first.close()
    StatusOutbox(path).close()  # released by close, and by a process's death (the flock)


# --- the relay ----------------------------------------------------------------------------------
async def test_an_event_leaves_the_outbox_only_once_the_broker_confirmed_it(tmp_path: Path) -> None:
    bus = GatedBus()
    relay = StatusRelay(bus, StatusOutbox(tmp_path / "outbox.sqlite3"), backoff=FAST)  # type: ignore[arg-type]
    relay.start()
    bus.confirming.clear()  # published, not confirmed yet
    entry_id = await relay.append(event("a", 1))
    sent = asyncio.create_task(relay.sent(entry_id))
    await until(lambda: bus.attempts == 1)
    await asyncio.sleep(0.1)
    assert await relay.backlog() == 1 and not sent.done()

    bus.confirming.set()
    await asyncio.wait_for(sent, 5)
    assert await relay.backlog() == 0 and [e.sequence for e in bus.confirmed] == [1]

    bus.refusing = True  # an outage: retried, never dropped, and kept on disk meanwhile
    entry_id = await relay.append(event("a", 2))
    await until(lambda: bus.attempts >= 10)
    assert await relay.backlog() == 1
    bus.refusing = False
    await asyncio.wait_for(relay.sent(entry_id), 5)
    assert [e.sequence for e in bus.confirmed] == [1, 2] and await relay.backlog() == 0
    assert await relay.close(timeout=1)


async def test_an_outage_keeps_each_job_s_order_and_only_its_newest_beat(tmp_path: Path) -> None:
    bus = GatedBus()
    relay = StatusRelay(bus, StatusOutbox(tmp_path / "outbox.sqlite3"), backoff=FAST)  # type: ignore[arg-type]
    jobs = [TrainJob(request=TrainRequest(dataset_uri=f"s3://lake/{name}/")) for name in "ab"]
    publishers = [JobStatusPublisher(relay, job, source="/test/worker", settle_timeout=0.1) for job in jobs]
    bus.refusing = True
    for beat in range(200):
        for publisher in publishers:
            publisher.note(step=beat)
            await publisher.heartbeat()
        if beat == 100:
            publishers[0].emit_threadsafe(JobState.RUNNING, JobPhase.TRAINING, epoch=1, metrics={"f1": 0.5})
    await publishers[0].publish(JobState.SUCCEEDED, None)
    t0 = time.monotonic()
    await publishers[0].close()  # the handler's end during an outage: bounded by settle_timeout
    assert time.monotonic() - t0 < 1.0
    assert await relay.backlog() <= 4  # a's epoch, a's newest beat, a's end, b's newest beat

    bus.refusing = False
    await publishers[1].close()
    assert await relay.close(timeout=5)
    for job in jobs:
        sequences = [e.sequence for e in bus.confirmed if e.job_id == job.job_id]
        assert sequences == sorted(sequences), job.job_id
    a = [e for e in bus.confirmed if e.job_id == jobs[0].job_id]
    assert a[-1].state is JobState.SUCCEEDED and any(e.data.metrics for e in a)
    assert len(bus.confirmed) <= 4 + 2  # the beats in flight when the outage began may go too
