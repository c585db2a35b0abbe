"""The ingress records the broker's confirms many jobs per write (ingress/acceptance.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import pytest

from infra.views import JobViewStore
from ingress.acceptance import AcceptanceRecorder
from ingress.submit import ViewReader
from tests.test_view_store import queued


class _CountedWrites:
    """The real store; counts mark_accepted_many calls, and can fail the next ones."""

    def __init__(self, store: JobViewStore) -> None:
        self.store = store
        self.calls: list[int] = []
        self.fail_next = 0

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    async def mark_accepted_many(self, accepted: Mapping[str, int]) -> int:
        self.calls.append(len(accepted))
        await asyncio.sleep(0.01)  # a round trip, so that records gather behind it
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("store down")
        return await self.store.mark_accepted_many(accepted)


async def test_records_that_arrive_during_a_write_share_the_next_one(view_store: JobViewStore) -> None:
    jobs = [f"job-{i:02d}" for i in range(40)]
    for job_id in jobs:
        await view_store.apply(queued(job_id))
    counted = _CountedWrites(view_store)
    recorder = AcceptanceRecorder(ViewReader(counted, timeout_s=5, retry_after_s=1))  # type: ignore[arg-type]
    recorder.record(jobs[0], 0)  # alone: written at once
    await asyncio.sleep(0)
    for job_id in jobs[1:]:
        recorder.record(job_id, 0)
    await recorder.close()
    assert counted.calls == [1, 39]
    assert [(await view_store.get(j)).accepted_attempt for j in jobs] == [0] * len(jobs)


async def test_a_failed_write_is_logged_and_the_records_after_it_are_still_written(
        view_store: JobViewStore, caplog: pytest.LogCaptureFixture) -> None:
    for job_id in ("lost", "kept"):
        await view_store.apply(queued(job_id))
    counted = _CountedWrites(view_store)
    counted.fail_next = 1
    recorder = AcceptanceRecorder(ViewReader(counted, timeout_s=5, retry_after_s=1))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="ingress.acceptance"):
        recorder.record("lost", 0)
        await asyncio.sleep(0)
        recorder.record("kept", 0)
        await recorder.close()
    assert "were not recorded" in caplog.text and "lost" in caplog.text
    assert (await view_store.get("lost")).accepted_attempt is None  # the watchdog's republish covers it
    assert (await view_store.get("kept")).accepted_attempt == 0
