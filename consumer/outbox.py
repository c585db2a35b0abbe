"""The status outbox: a worker's status events on local disk until the broker has confirmed them.

Every status event a worker publishes is appended here first and removed only once RabbitMQ
confirmed it (consumer/status_relay.py sends them), so neither a broker outage of any length nor a
killed worker process loses one: the next process on the same path sends what is left.

SQLite in WAL mode with ``synchronous=FULL``, not an append-only file of our own: a commit is
atomic and fsync'd (a torn or unfinished write is rolled back when the file is opened, never read
as half an event); the two things an append-only file makes hard, removing a confirmed event and
replacing a job's unsent heartbeat with a newer one, are one statement each; and it is stdlib.

The calls are blocking (an fsync each commit): callers run them on one thread of their own
(:class:`consumer.status_relay.StatusRelay` does), which also keeps appends in call order.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from schemas import StatusEvent

IN_MEMORY = ":memory:"

# AUTOINCREMENT: an id is never reused, even after the newest row was removed, so it names one
# event for the life of the file (the relay reports progress as "sent through id N").
_SCHEMA = """
CREATE TABLE IF NOT EXISTS status_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    heartbeat INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS status_outbox_heartbeats ON status_outbox (job_id) WHERE heartbeat = 1;
"""


class OutboxInUse(RuntimeError):
    """Another live process (or worker) holds this outbox: two senders would race on it."""


class OutboxEntry(BaseModel):
    """An unsent event and its place in the send order."""

    model_config = ConfigDict(frozen=True)

    id: int
    event: StatusEvent


class StatusOutbox:
    """Durable FIFO of status events; see the module docstring. Not thread-safe: one thread."""

    def __init__(self, path: Path | str) -> None:
        self._lock_fd: int | None = None
        if path != IN_MEMORY:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock_exclusively(path.with_name(path.name + ".lock"))
        self.path = path
        try:
            # check_same_thread off: opened here, then used on the relay's I/O thread only.
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: every commit fsyncs the WAL, so an event survives a power cut, not only a crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._release_lock()
            raise

    @classmethod
    def in_memory(cls) -> StatusOutbox:
        """Not durable: for a publisher without a disk of its own (tests, embedding code)."""
        return cls(IN_MEMORY)

    def append(self, event: StatusEvent, *, heartbeat: bool = False) -> int:
        """Add ``event`` at the end, durably; returns its id. A heartbeat replaces the job's unsent
        one: it only re-states the job, so the newest says it all (a long outage stays small)."""
        with self._transaction():
            if heartbeat:
                self._db.execute("DELETE FROM status_outbox WHERE job_id = ? AND heartbeat = 1", (event.job_id,))
            cursor = self._db.execute(
                "INSERT INTO status_outbox (job_id, heartbeat, body) VALUES (?, ?, ?)",
                (event.job_id, int(heartbeat), event.to_json_bytes()))
        return int(cursor.lastrowid)

    def pending(self, limit: int = 100) -> list[OutboxEntry]:
        """The oldest ``limit`` unsent events, in the order they were appended."""
        rows = self._db.execute("SELECT id, body FROM status_outbox ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [OutboxEntry(id=row_id, event=StatusEvent.from_json(body)) for row_id, body in rows]

    def remove(self, entry_id: int) -> None:
        """The broker confirmed the event (an id already gone, a replaced heartbeat, is fine)."""
        with self._transaction():
            self._db.execute("DELETE FROM status_outbox WHERE id = ?", (entry_id,))

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM status_outbox").fetchone()[0])

    def last_id(self) -> int:
        """The id of the newest event ever appended (0 for none), sent or not."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'status_outbox'").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            self._release_lock()

    def _transaction(self) -> sqlite3.Connection:
        # isolation_level=None (autocommit) plus an explicit BEGIN IMMEDIATE: the statements of
        # one append commit together, and the connection used as a context manager commits or
        # rolls back.
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None


def _lock_exclusively(lock_path: Path) -> int:
    """An flock held while the outbox is open (the OS drops it when the process dies, SIGKILL too)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutboxInUse(f"the status outbox {lock_path.with_suffix('')} is in use by another worker; give "
                          "each worker process a data directory of its own") from None
    return fd
