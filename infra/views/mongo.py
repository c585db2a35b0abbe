"""Job views in MongoDB, through PyMongo's async API (``pymongo.AsyncMongoClient``).

Each event is projected with one conditional upsert that both changes the view and records the
processed position (``last_sequence``), as an event-sourcing projector does; see
:mod:`infra.views.merge` for the ordering policy.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from infra.views.list_order import LIST_KEY, decode_cursor, encode_cursor, list_key, with_list_key
from infra.views.merge import (
    ViewUpdate,
    cancel_fields,
    acceptance_filter,
    cancel_filter,
    claim_filter,
    check_limit,
    doc_to_view,
    plan_update,
)
from schemas.events import StatusEvent
from schemas.jobs import JobState, JobView

DEFAULT_DATABASE = "cdtrain"
DEFAULT_COLLECTION = "jobs"
# Newest first, ties broken by job id (the ``job_id`` field, a copy of ``_id``), for the few
# views one idempotency key finds.
_NEWEST_FIRST = [("submitted_at", DESCENDING), ("job_id", DESCENDING)]
# The same order as one field (infra/views/list_order.py): list() pages by a range on it.
_LIST_ORDER = [(LIST_KEY, DESCENDING)]
_BACKFILL_BATCH = 1000
_LAST_WRITTEN_JOBS = 10_000


class MongoJobViewStore:
    def __init__(self, collection: AsyncCollection, *, client: AsyncMongoClient | None = None) -> None:
        """Use ``collection``; ``client``, when given, is owned and closed by :meth:`close`."""
        self._col = collection
        self._client = client
        # Per job, the rule-8 fields of the last event this store wrote: a guess at which of the
        # two rule-8 filters the view matches now (another writer may have moved it since).
        self._last_unmoved: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        database: str | None = None,
        collection: str = DEFAULT_COLLECTION,
        **client_options: Any,
    ) -> "MongoJobViewStore":
        """A store on its own client. ``database`` defaults to the URL's, then ``cdtrain``.

        No I/O happens here: the client connects on first use.
        """
        options: dict[str, Any] = {"tz_aware": True, "tzinfo": timezone.utc, **client_options}
        client: AsyncMongoClient = AsyncMongoClient(url, **options)
        db = client[database] if database else client.get_default_database(default=DEFAULT_DATABASE)
        return cls(db[collection], client=client)

    @property
    def collection(self) -> AsyncCollection:
        return self._col

    # --- writes ----------------------------------------------------------------------------

    async def apply(self, event: StatusEvent, *, expect_sequence: int | None = None) -> bool:
        plan = plan_update(event)
        update = _advance_update(plan)
        moved = _advance_update(plan, moved=True)
        if expect_sequence is not None:  # rule 7: compare-and-set, never an upsert
            if expect_sequence >= plan.sequence:
                return False
            at = {"_id": plan.job_id, "last_sequence": expect_sequence}
            if (await self._col.update_one({"$and": [at, plan.unmoved]}, update)).matched_count:
                return True
            return (await self._col.update_one(at, moved)).matched_count == 1
        newer = {"_id": plan.job_id, "last_sequence": {"$lt": plan.sequence}}
        # Rule 8 takes two filters, unmoved (leaves step_at) and moved (sets it); which one the
        # view matches, the last event this store wrote for the job tells (a wrong guess costs
        # one round trip, never a wrong write). Explicit $and for nx-27017, as in list().
        if self._moved_since_last_write(plan):
            if (await self._col.update_one({"$and": [newer, _moved_filter(plan)]}, moved)).matched_count:
                return self._written(plan)
        if (await self._col.update_one({"$and": [newer, plan.unmoved]}, update)).matched_count:
            return self._written(plan)
        # A new view, a move, or a stale event.
        update = moved
        try:
            await self._col.update_one(newer, update, upsert=True)
            return self._written(plan)
        except DuplicateKeyError:
            # The filter missed and the insert hit an existing _id: either the view is already
            # at or past this sequence, or a concurrent writer created it between our miss and
            # our insert. A plain conditional update tells the two apart.
            if (await self._col.update_one(newer, update)).matched_count:
                return self._written(plan)
        await self._merge_stale(plan)
        return False

    def _moved_since_last_write(self, plan: ViewUpdate) -> bool:
        last = self._last_unmoved.get(plan.job_id)
        return last is not None and any(last.get(name) != value for name, value in plan.unmoved.items())

    def _written(self, plan: ViewUpdate) -> bool:
        last = self._last_unmoved
        last[plan.job_id] = {**last.pop(plan.job_id, {}), **plan.unmoved}
        if len(last) > _LAST_WRITTEN_JOBS:
            last.popitem(last=False)  # the job heard from least recently
        return True

    async def create(self, event: StatusEvent) -> bool:
        plan = plan_update(event)
        update = _advance_update(plan, moved=True)
        document = {**update["$set"], **update.get("$setOnInsert", {})}
        try:
            result = await self._col.update_one({"_id": plan.job_id}, {"$setOnInsert": document}, upsert=True)
        except DuplicateKeyError:  # a concurrent creator inserted it between our miss and our insert
            return False
        return result.upserted_id is not None

    async def mark_accepted(self, job_id: str, attempt: int) -> bool:
        result = await self._col.update_one(acceptance_filter(job_id, attempt), {"$set": {"accepted_attempt": attempt}})
        return result.matched_count == 1

    async def mark_accepted_many(self, accepted: Mapping[str, int]) -> int:
        by_attempt: dict[int, list[str]] = {}
        for job_id, attempt in accepted.items():
            by_attempt.setdefault(attempt, []).append(job_id)
        raised = 0
        for attempt, job_ids in by_attempt.items():  # one write per attempt number: almost always one
            result = await self._col.update_many(acceptance_filter(job_ids, attempt), {"$set": {"accepted_attempt": attempt}})
            raised += result.modified_count
        return raised

    async def claim(self, event: StatusEvent) -> bool:
        plan = plan_update(event)
        claim = claim_filter(plan.job_id, plan.sequence)
        update = _advance_update(plan, moved=True)  # a claim always moves the job (rule 8)
        try:
            await self._col.update_one(claim, update, upsert=True)
            return True
        except DuplicateKeyError:
            # The view exists and refuses the claim, or a concurrent writer created it between
            # our miss and our insert: the plain conditional update tells the two apart.
            return (await self._col.update_one(claim, update)).matched_count == 1

    async def request_cancel(self, job_id: str, at: datetime, reason: str) -> tuple[JobView | None, bool]:
        doc = await self._col.find_one_and_update(cancel_filter(job_id), {"$set": cancel_fields(at, reason)},
                                                  return_document=ReturnDocument.AFTER)
        if doc is not None:
            return doc_to_view(doc), True
        doc = await self._col.find_one({"_id": job_id})  # unknown, ended, or already requested
        return (doc_to_view(doc) if doc is not None else None), False

    async def _merge_stale(self, plan: ViewUpdate) -> None:
        if plan.submission is not None:
            # {"request": None} matches a missing or null request: fill once, never overwrite.
            submission = with_list_key(plan.submission, plan.job_id)
            await self._col.update_one({"_id": plan.job_id, "request": None}, {"$set": submission})
        if plan.history is not None:
            path = f"history.{plan.history.epoch}"
            await self._col.update_one(
                # Explicit $and for nx-27017, as in list().
                {
                    "$and": [
                        {"_id": plan.job_id},
                        {"$or": [{path: {"$exists": False}}, {f"{path}.sequence": {"$lt": plan.history.sequence}}]},
                    ]
                },
                {"$set": {path: plan.history.doc}},
            )

    # --- reads -----------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobView | None:
        doc = await self._col.find_one({"_id": job_id})
        return doc_to_view(doc) if doc is not None else None

    async def list(
        self, limit: int = 50, cursor: str | None = None, state: JobState | str | None = None
    ) -> tuple[list[JobView], str | None]:
        check_limit(limit)
        # One range on the list key (plus the state), never an $or: what any MongoDB-protocol
        # server serves from the (state,) list_key index. An implicit AND, not the explicit $and
        # of the other filters here: those keep it because nx-27017 drops a field condition that
        # sits beside an $or over datetimes ({"state": …, "$or": […]} matched other states);
        # with no $or that cannot happen, and nx-27017 uses the index only for the implicit form.
        query: dict[str, Any] = {}
        if state is not None:
            query["state"] = JobState(state).value
        if cursor:
            query[LIST_KEY] = {"$lt": decode_cursor(cursor)}
        # One extra document tells whether another page exists without a count query.
        docs = await self._col.find(query).sort(_LIST_ORDER).limit(limit + 1).to_list()
        page = [doc_to_view(d) for d in docs[:limit]]
        next_cursor = encode_cursor(list_key(page[-1].submitted_at, page[-1].job_id)) if len(docs) > limit else None
        return page, next_cursor

    async def find_by_idempotency_key(self, key: str) -> JobView | None:
        docs = await self._col.find({"request.idempotency_key": key}).sort(_NEWEST_FIRST).limit(1).to_list()
        return doc_to_view(docs[0]) if docs else None

    async def count_by_state(self) -> dict[JobState, int]:
        # One count per state, each from the (state, list_key) index's prefix (a count scan on
        # MongoDB), rather than a $group that reads every view: constant work at 100k jobs.
        states = list(JobState)
        counts = await asyncio.gather(*(self._col.count_documents({"state": s.value}) for s in states))
        return dict(zip(states, counts))

    async def ensure_indexes(self) -> None:
        """The indexes behind :meth:`list` (with and without a state) and the idempotency lookup,
        then the one-time backfill of ``list_key``.

        Idempotent. Nothing depends on index names (nx-27017 names them its own way), and the
        idempotency index is not unique: racing submissions share a derived job id instead
        (:func:`schemas.jobs.new_job_id`). Indexes come first so that a caller that stops waiting
        during a long backfill still has them; the backfill resumes at the next call.
        """
        await self._col.create_index(_LIST_ORDER)
        await self._col.create_index([("state", ASCENDING), *_LIST_ORDER])
        await self._col.create_index([("request.idempotency_key", ASCENDING)])
        await self._backfill_list_keys()

    async def _backfill_list_keys(self) -> int:
        """Give ``list_key`` to views written before it existed; how many got one.

        Views without it sort last on the first page and match no cursor's range, so they would
        vanish from deeper pages. Every write that sets ``submitted_at`` now sets the key too, so
        this finds work once per collection (and again only for views that a process of an
        earlier release wrote meanwhile). Each write is conditional on the ``submitted_at`` it was
        computed from and on the key still missing, so a concurrent write is never undone.
        """
        done = 0
        ops: list[UpdateOne] = []
        async for doc in self._col.find({LIST_KEY: {"$exists": False}}, {"submitted_at": 1}):
            submitted_at = doc.get("submitted_at")
            if not isinstance(submitted_at, datetime):
                continue  # not a view this store wrote: it cannot be listed in order either way
            ops.append(UpdateOne({"_id": doc["_id"], "submitted_at": submitted_at, LIST_KEY: {"$exists": False}},
                                 {"$set": {LIST_KEY: list_key(submitted_at, doc["_id"])}}))
            if len(ops) >= _BACKFILL_BATCH:
                done += (await self._col.bulk_write(ops, ordered=False)).modified_count
                ops = []
        if ops:
            done += (await self._col.bulk_write(ops, ordered=False)).modified_count
        return done

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def _moved_filter(plan: ViewUpdate) -> dict[str, Any]:
    """Rule 8's moved case: the complement of ``plan.unmoved`` (``$ne: None`` matches neither a
    null nor a missing field, as ``None`` matches both)."""
    return {"$or": [{name: {"$ne": value}} for name, value in plan.unmoved.items()]}


def _advance_update(plan: ViewUpdate, *, moved: bool = False) -> dict[str, Any]:
    to_set = dict(plan.advance)
    if moved:
        to_set.update(plan.moved)
    if plan.submission is not None:
        to_set.update(plan.submission)
    if plan.history is not None:
        to_set[f"history.{plan.history.epoch}"] = plan.history.doc
    # The list key changes in the same write as submitted_at, whichever of the two sets it.
    update: dict[str, Any] = {"$set": with_list_key(to_set, plan.job_id)}
    on_insert = {k: v for k, v in plan.on_insert.items() if k not in to_set}
    if on_insert:
        update["$setOnInsert"] = with_list_key(on_insert, plan.job_id)
    return update
