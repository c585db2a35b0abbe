"""In-process job views: the embedded default for a one-machine quick start (no MongoDB).

Holds the same storage documents as the Mongo store and applies the same plan
(:mod:`infra.views.merge`), so both backends behave alike (one test suite runs on both). With a
``path`` it reloads on start and rewrites the JSON file atomically after each change: views are
small, and a quick-start user keeps the job list across restarts.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from infra.views.list_order import decode_cursor, encode_cursor, list_key
from infra.views.merge import (
    ViewUpdate,
    cancel_fields,
    check_limit,
    doc_to_view,
    is_unmoved,
    may_accept,
    may_claim,
    may_request_cancel,
    plan_update,
)
from schemas.events import StatusEvent
from schemas.jobs import JobState, JobView


class InMemoryJobViewStore:
    def __init__(self, path: str | Path | None = None) -> None:
        self._path = Path(path) if path is not None else None
        # A thread lock, not an asyncio one: the embedded mode may apply events from a worker
        # thread while the HTTP edge reads on the event loop. No await happens while held.
        self._lock = threading.Lock()
        self._docs: dict[str, dict[str, Any]] = self._load() if self._path else {}

    # --- writes ----------------------------------------------------------------------------

    async def apply(self, event: StatusEvent, *, expect_sequence: int | None = None) -> bool:
        plan = plan_update(event)
        with self._lock:
            doc = self._docs.get(plan.job_id)
            if expect_sequence is not None:  # rule 7: compare-and-set
                if doc is None or doc["last_sequence"] != expect_sequence or expect_sequence >= plan.sequence:
                    return False
                self._advance(doc, plan)
                self._save()
                return True
            if doc is None:
                doc = {"_id": plan.job_id, **plan.on_insert}
                self._docs[plan.job_id] = doc
                advanced = True
            else:
                advanced = doc["last_sequence"] < plan.sequence
            changed = self._advance(doc, plan) if advanced else self._merge_stale(doc, plan)
            if changed:
                self._save()
        return advanced

    async def create(self, event: StatusEvent) -> bool:
        plan = plan_update(event)
        with self._lock:
            if plan.job_id in self._docs:
                return False
            doc = self._docs[plan.job_id] = {"_id": plan.job_id, **plan.on_insert}
            self._advance(doc, plan)
            self._save()
        return True

    async def mark_accepted(self, job_id: str, attempt: int) -> bool:
        with self._lock:
            doc = self._docs.get(job_id)
            if doc is None or not may_accept(doc, attempt):
                return False
            doc["accepted_attempt"] = attempt
            self._save()
        return True

    async def mark_accepted_many(self, accepted: Mapping[str, int]) -> int:
        with self._lock:
            raised = 0
            for job_id, attempt in accepted.items():
                doc = self._docs.get(job_id)
                if doc is not None and may_accept(doc, attempt):
                    doc["accepted_attempt"] = attempt
                    raised += 1
            if raised:
                self._save()
        return raised

    async def claim(self, event: StatusEvent) -> bool:
        plan = plan_update(event)
        with self._lock:
            doc = self._docs.get(plan.job_id)
            if doc is None:
                doc = self._docs[plan.job_id] = {"_id": plan.job_id, **plan.on_insert}
            elif not may_claim(doc, plan.sequence):
                return False
            self._advance(doc, plan)
            self._save()
        return True

    async def request_cancel(self, job_id: str, at: datetime, reason: str) -> tuple[JobView | None, bool]:
        with self._lock:
            doc = self._docs.get(job_id)
            if doc is None:
                return None, False
            recorded = may_request_cancel(doc)
            if recorded:
                doc.update(cancel_fields(at, reason))
                self._save()
            return doc_to_view(doc), recorded

    @staticmethod
    def _advance(doc: dict[str, Any], plan: ViewUpdate) -> bool:
        if not is_unmoved(doc, plan):  # rule 8, judged on the document before this event
            doc.update(plan.moved)
        doc.update(copy.deepcopy(plan.advance))
        if plan.submission is not None:
            doc.update(copy.deepcopy(plan.submission))
        if plan.history is not None:
            doc.setdefault("history", {})[str(plan.history.epoch)] = copy.deepcopy(plan.history.doc)
        return True

    @staticmethod
    def _merge_stale(doc: dict[str, Any], plan: ViewUpdate) -> bool:
        changed = False
        if plan.submission is not None and doc.get("request") is None:
            doc.update(copy.deepcopy(plan.submission))
            changed = True
        if plan.history is not None:
            history = doc.setdefault("history", {})
            stored = history.get(str(plan.history.epoch))
            if stored is None or stored["sequence"] < plan.history.sequence:
                history[str(plan.history.epoch)] = copy.deepcopy(plan.history.doc)
                changed = True
        return changed

    # --- reads -----------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobView | None:
        with self._lock:
            doc = self._docs.get(job_id)
            return doc_to_view(doc) if doc is not None else None

    async def list(
        self, limit: int = 50, cursor: str | None = None, state: JobState | str | None = None
    ) -> tuple[list[JobView], str | None]:
        check_limit(limit)
        wanted = JobState(state).value if state is not None else None
        after = decode_cursor(cursor) if cursor else None
        with self._lock:
            # The Mongo store's order and cursors (infra/views/list_order.py), so both backends
            # give the same pages; the key is computed here rather than stored.
            keyed = [(list_key(d["submitted_at"], d["_id"]), d) for d in self._docs.values()
                     if wanted is None or d.get("state") == wanted]
            if after is not None:
                keyed = [(k, d) for k, d in keyed if k < after]
            keyed.sort(key=lambda kd: kd[0], reverse=True)  # keys are unique: they end in the job id
            page = [doc_to_view(d) for _, d in keyed[:limit]]
        return page, (encode_cursor(keyed[limit - 1][0]) if len(keyed) > limit else None)

    async def find_by_idempotency_key(self, key: str) -> JobView | None:
        with self._lock:
            matches = [d for d in self._docs.values() if (d.get("request") or {}).get("idempotency_key") == key]
            if not matches:
                return None
            return doc_to_view(max(matches, key=lambda d: (d["submitted_at"], d["_id"])))

    async def count_by_state(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        with self._lock:
            for doc in self._docs.values():
                if doc.get("state") is not None:
                    counts[JobState(doc["state"])] += 1
        return counts

    async def ensure_indexes(self) -> None:
        """Nothing to index in memory; present so callers need not know the backend."""

    async def close(self) -> None:
        """Nothing to release: every change is already on disk when a path is set."""

    # --- persistence -------------------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, Any]]:
        assert self._path is not None
        if not self._path.exists():
            return {}
        with self._path.open(encoding="utf-8") as fh:
            docs = json.load(fh, object_hook=_decode)
        if not isinstance(docs, dict):
            raise ValueError(f"{self._path}: not a job view file")
        return docs

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(self._docs, fh, default=_encode)
        # Atomic replace: a crash mid-write leaves the previous file, never a truncated one.
        os.replace(tmp, self._path)


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$date": value.isoformat()}
    raise TypeError(f"cannot store {type(value).__name__} in a job view file")


def _decode(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$date" in obj:
        return datetime.fromisoformat(obj["$date"])
    return obj
