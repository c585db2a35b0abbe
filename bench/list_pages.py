#!/usr/bin/env python
"""Job list latency: what ``GET /train?limit=20`` costs the view store at 1k, 10k and 100k jobs.

For each size the store call behind the route, ``MongoJobViewStore.list(limit=20, ...)``, is timed
for the first page, a deep page reached through cursors (page 51, or the last page when there are
fewer), and the same two with ``state=failed``. Median of ``--repeats`` calls each, after one
untimed call.

"before" is the previous query on the same collection, in the same run: a cursor as an ``$or`` of
two comparisons on ``(submitted_at, job_id)`` (explicit ``$and`` with the state), sorted by those
two fields, through the collection directly, with the same page conversion as ``list()``; the
collection also has that query's indexes. "after" is ``list()`` itself: one range on ``list_key``
(infra/views/list_order.py). Each page is checked against the order computed here from the inserted
views; a wrong page is marked in the table.

The views are clones of one real view (a job projected through its whole lifecycle by the store
itself), with varied ``submitted_at`` (random milliseconds over 30 days, some shared) and states
(20% failed), added in bulk (``insert_many`` in batches of 1,000) as the collection grows from one
size to the next. The script starts nx-27017 itself (a temporary data dir), or uses
``--mongodb-url``; it drops its database at the end.

    .venv/bin/python bench/list_pages.py                                   # about 4 minutes on 2 cores
    .venv/bin/python bench/list_pages.py --sizes 1000,10000 --repeats 21 --json /tmp/list.json
    .venv/bin/python bench/list_pages.py --mongodb-url mongodb://127.0.0.1:27017 --no-before
    .venv/bin/python bench/list_pages.py --backfill      # + the one-time backfill of 100k views: 7 minutes

``--backfill`` also removes ``list_key`` from every view of the largest size and times
``ensure_indexes`` giving it back, as on a collection written before the key existed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pymongo import ASCENDING, DESCENDING  # noqa: E402

from bench.machine import core_count, cpu_model  # noqa: E402
from bench.service_latency import start_nx, stop_process  # noqa: E402
from infra.views import MongoJobViewStore  # noqa: E402
from infra.views.list_order import LIST_KEY, list_key  # noqa: E402
from infra.views.merge import doc_to_view  # noqa: E402
from schemas import StatusEvent, TrainJob, TrainRequest, event_source  # noqa: E402

LIMIT = 20
DEEP_PAGE = 51
BATCH = 1000
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SPREAD_MS = 30 * 24 * 3600 * 1000
STATES = ["succeeded"] * 11 + ["failed"] * 4 + ["queued"] * 2 + ["running", "cancelled"]  # 20% failed
# The previous list order and its indexes ("before").
OLD_ORDER = [("submitted_at", DESCENDING), ("job_id", DESCENDING)]
Position = tuple[datetime, str]


# --- the views ---------------------------------------------------------------------------------------
async def real_view(store: MongoJobViewStore) -> dict[str, Any]:
    """One job projected through its whole lifecycle by the store: the shape every clone copies."""
    worker = event_source("worker", "bench-0")
    job = TrainJob(request=TrainRequest(dataset_uri="s3://datasets/levir-cd/", config={"epochs": 3}), submitted_at=T0)
    events = [StatusEvent.queued(job, source=event_source("ingress", "bench")),
              StatusEvent.for_job(job.job_id, 1, "starting", source=worker, phase="downloading", mlflow_run_id="r1")]
    for epoch in (1, 2, 3):
        events.append(StatusEvent.for_job(job.job_id, 1 + epoch, "running", source=worker, phase="training",
                                          epoch=epoch, epochs=3, step=epoch * 40, mlflow_run_id="r1",
                                          metrics={"val_f1": 0.5 + epoch / 10, "loss": 1.0 / epoch}))
    events.append(StatusEvent.for_job(job.job_id, 5, "succeeded", source=worker, epoch=3, epochs=3, step=120,
                                      mlflow_run_id="r1", metrics={"val_f1": 0.8}, model_version="4"))
    for event in events:
        await store.apply(event)
    doc = await store.collection.find_one({"_id": job.job_id})
    await store.collection.delete_one({"_id": job.job_id})
    assert doc is not None
    return doc


def clones(template: dict[str, Any], start: int, count: int, rng: random.Random) -> list[dict[str, Any]]:
    docs = []
    for n in range(start, start + count):
        # Every fifth view shares the millisecond of the one before: ties go by job id.
        if n % 5 == 0 and docs:
            submitted_at = docs[-1]["submitted_at"]
        else:
            submitted_at = T0 + timedelta(milliseconds=rng.randrange(SPREAD_MS))
        job_id = f"{rng.getrandbits(64):016x}{n:07d}"
        state = rng.choice(STATES)
        doc = copy.deepcopy(template)
        doc.update(_id=job_id, job_id=job_id, submitted_at=submitted_at, state=state,
                   updated_at=submitted_at + timedelta(minutes=7),
                   error="CUDA out of memory" if state == "failed" else None)
        doc[LIST_KEY] = list_key(submitted_at, job_id)
        docs.append(doc)
    return docs


# --- the two ways of listing -------------------------------------------------------------------------
async def list_before(store: MongoJobViewStore, after: Position | None, state: str | None) -> list[str]:
    """The previous ``list()``: an $or cursor over (submitted_at, job_id), explicit $and with the state."""
    clauses: list[dict[str, Any]] = [{"state": state}] if state else []
    if after is not None:
        submitted_at, job_id = after
        clauses.append({"$or": [{"submitted_at": {"$lt": submitted_at}},
                                {"submitted_at": submitted_at, "job_id": {"$lt": job_id}}]})
    query = {"$and": clauses} if len(clauses) > 1 else (clauses[0] if clauses else {})
    docs = await store.collection.find(query).sort(OLD_ORDER).limit(LIMIT + 1).to_list()
    return [doc_to_view(d).job_id for d in docs[:LIMIT]]


async def list_after(store: MongoJobViewStore, cursor: str | None, state: str | None) -> list[str]:
    page, _ = await store.list(limit=LIMIT, cursor=cursor, state=state)
    return [v.job_id for v in page]


async def median_ms(call: Callable[[], Awaitable[list[str]]], repeats: int) -> tuple[float, list[str]]:
    page = await call()  # untimed: the first call of a query warms the server's caches
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3, page


async def measure_size(store: MongoJobViewStore, order: list[Position], states: dict[str, str],
                       args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for state in (None, "failed"):
        expected = [job_id for _, job_id in order if state is None or states[job_id] == state]
        last_page = max(1, -(-len(expected) // LIMIT))
        page = min(DEEP_PAGE, last_page)
        # The cursor of the deep page, walked page by page as a client does.
        cursor = None
        for _ in range(page - 1):
            _, cursor = await store.list(limit=LIMIT, cursor=cursor, state=state)
        start = (page - 1) * LIMIT
        want = expected[start:start + LIMIT]
        before_at = next(p for p in order if p[1] == expected[start - 1]) if page > 1 else None
        for name, cursor_now, after_now in (("first page", None, None), ("deep page", cursor, before_at)):
            which = 1 if cursor_now is None else page
            wanted = expected[:LIMIT] if cursor_now is None else want
            row: dict[str, Any] = {"jobs": len(order), "state": state, "case": name, "page": which}
            after_ms, got = await median_ms(lambda c=cursor_now: list_after(store, c, state), args.repeats)
            row.update(after_ms=after_ms, after_correct=got == wanted)
            if args.before:
                before_ms, got = await median_ms(lambda a=after_now: list_before(store, a, state), args.before_repeats)
                row.update(before_ms=before_ms, before_correct=got == wanted, ratio=before_ms / after_ms)
            rows.append(row)
    return rows


async def time_backfill(store: MongoJobViewStore, order: list[Position]) -> dict[str, Any]:
    """The one-time cost of ``ensure_indexes`` on a collection written before ``list_key``: the
    whole collection loses the key, then ``ensure_indexes`` gives it back (and once more, idle)."""
    await store.collection.update_many({}, {"$unset": {LIST_KEY: ""}})
    started = time.perf_counter()
    await store.ensure_indexes()
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    await store.ensure_indexes()
    again_s = time.perf_counter() - started
    cursor, seen = None, []
    for _ in range(DEEP_PAGE):
        page, cursor = await store.list(limit=LIMIT, cursor=cursor)
        seen += [v.job_id for v in page]
    correct = seen == [job_id for _, job_id in order[:len(seen)]]
    print(f"backfill of {len(order):,} views: {first_s:.1f} s (again: {again_s * 1e3:.0f} ms); "
          f"pages 1-{DEEP_PAGE} afterwards {'correct' if correct else 'WRONG'}", file=sys.stderr, flush=True)
    return {"views": len(order), "ensure_indexes_s": first_s, "again_s": again_s, "pages_correct": correct}


async def run(args: argparse.Namespace, url: str, results: dict[str, Any]) -> None:
    database = f"cdtrain_bench_{uuid.uuid4().hex[:12]}"
    store = MongoJobViewStore.connect(url, database=database, serverSelectionTimeoutMS=10_000)
    try:
        results["server"] = (await store.collection.database.client.admin.command("buildInfo")).get("version")
        await store.ensure_indexes()
        if args.before:  # the indexes the previous query had
            await store.collection.create_index(OLD_ORDER)
            await store.collection.create_index([("state", ASCENDING), *OLD_ORDER])
        template = await real_view(store)
        rng = random.Random(args.seed)
        order: list[Position] = []
        states: dict[str, str] = {}
        for size in args.sizes:
            started = time.perf_counter()
            for first in range(len(order), size, BATCH):
                docs = clones(template, first, min(BATCH, size - first), rng)
                await store.collection.insert_many(docs, ordered=False)
                order += [(d["submitted_at"], d["_id"]) for d in docs]
                states.update((d["_id"], d["state"]) for d in docs)
            results["fill_s"][str(size)] = time.perf_counter() - started
            order.sort(reverse=True)
            rows = await measure_size(store, order, states, args)
            results["rows"] += rows
            print(f"{size:>7} jobs: filled in {results['fill_s'][str(size)]:.1f} s; "
                  + ", ".join(f"{r['case']}{' failed' if r['state'] else ''} {r['after_ms']:.1f} ms" for r in rows),
                  file=sys.stderr, flush=True)
        if args.backfill:
            results["backfill"] = await time_backfill(store, order)
    finally:
        await store.collection.database.client.drop_database(database)
        await store.close()


def table(results: dict[str, Any]) -> str:
    before = any("before_ms" in r for r in results["rows"])
    head = "| jobs | query | page | " + ("before (median) | after (median) | before/after |" if before else "median |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]

    def cell(ms: float, correct: bool) -> str:
        return f"{ms:,.1f} ms" + ("" if correct else " (wrong page)")

    for r in results["rows"]:
        query = "all" if r["state"] is None else f"state={r['state']}"
        line = f"| {r['jobs']:,} | {query}, {r['case']} | {r['page']} | "
        if before:
            line += (f"{cell(r['before_ms'], r['before_correct'])} | {cell(r['after_ms'], r['after_correct'])} "
                     f"| {r['ratio']:,.1f}× |")
        else:
            line += f"{cell(r['after_ms'], r['after_correct'])} |"
        lines.append(line)
    m = results["machine"]
    lines.append(f"\nmachine: {m['cpu']}, {m['cores']} cores; Python {m['python']}; {results['server_name']} "
                 f"(server version {results['server']}); limit={LIMIT}; median of {results['params']['repeats']} "
                 f"(before: {results['params']['before_repeats']})")
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000", help="collection sizes, growing (default 1000,10000,100000)")
    p.add_argument("--repeats", type=int, default=21, help="timed list() calls per cell (default 21)")
    p.add_argument("--before-repeats", type=int, default=5, help="timed calls of the previous query (default 5)")
    p.add_argument("--no-before", dest="before", action="store_false", help="time list() only")
    p.add_argument("--backfill", action="store_true",
                   help="at the end, also time ensure_indexes' backfill of list_key over the largest size")
    p.add_argument("--mongodb-url", default=None, help="use this server instead of starting nx-27017")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    results: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cores": core_count(), "python": platform.python_version()},
        "params": {"sizes": args.sizes, "limit": LIMIT, "deep_page": DEEP_PAGE, "repeats": args.repeats,
                   "before_repeats": args.before_repeats if args.before else None, "seed": args.seed},
        "server_name": "MongoDB server at --mongodb-url" if args.mongodb_url else f"nx-27017 {_version('nx-27017')}",
        "fill_s": {}, "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="cdtrain-bench-list-") as tmp:
        proc = None
        url = args.mongodb_url
        if url is None:
            proc, url = start_nx(Path(tmp))
        try:
            asyncio.run(run(args, url, results))
        finally:
            if proc is not None:
                stop_process(proc)
    print(table(results))
    if "backfill" in results:
        b = results["backfill"]
        print(f"backfill: ensure_indexes gave list_key to {b['views']:,} views in {b['ensure_indexes_s']:.1f} s "
              f"(a second call: {b['again_s'] * 1e3:.0f} ms); pages afterwards "
              f"{'correct' if b['pages_correct'] else 'WRONG'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    wrong = [r for r in results["rows"] if not r["after_correct"]]
    return 1 if wrong or not results.get("backfill", {}).get("pages_correct", True) else 0


if __name__ == "__main__":
    raise SystemExit(main())
