#!/usr/bin/env python
"""Dataset fetch from an S3 endpoint: MB/s of parallel downloads against one at a time.

The worker's own code (``consumer.dataset_fetch.fetch_dataset`` over ``S3ObjectStore``) fetches
two datasets from an S3 endpoint into an empty cache each time:

- **tiles**: a prefix of ``--tiles`` small objects (``--tile-kb`` each; the size of a 256² PNG
  tile), the layout people upload by syncing a folder;
- **archive**: the same bytes as one zip archive (stored, not compressed: PNG does not shrink).

For the prefix, ``max_concurrency`` 1 (one object at a time) against the default (16); an
archive is one object, so its figure is one stream plus the extraction. Rounds alternate the
order; figures are medians of ``--rounds``. MB/s counts the dataset's bytes over the call's wall
time, from the first request to the dataset being ready in the cache.

By default the endpoint is moto (``python -m moto.server``, started here): on loopback it
measures the client's per-request cost, which is what parallelism hides on a real endpoint too,
where each request also waits a network round trip. ``--endpoint-url`` (with the usual AWS
variables for credentials) measures another endpoint, e.g. MinIO.

    .venv/bin/python bench/dataset_fetch.py                      # about 1 minute on 2 cores
    .venv/bin/python bench/dataset_fetch.py --tiles 2000 --rounds 5 --json /tmp/fetch.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import core_count, cpu_model  # noqa: E402
from bench.service_latency import start_moto, stop_process  # noqa: E402
from consumer.dataset_fetch import fetch_dataset  # noqa: E402
from infra.objects.models import S3Settings  # noqa: E402
from infra.objects.s3 import S3ObjectStore  # noqa: E402

DEFAULT_CONCURRENCY = fetch_dataset.__kwdefaults__["max_concurrency"]


def make_tree(tiles: int, tile_bytes: int, seed: int = 0) -> dict[str, bytes]:
    """A LEVIR-like tiled layout: A/, B/ and label/ thirds of ``tiles`` objects of random bytes."""
    rng = random.Random(seed)
    tree = {}
    for i in range(tiles):
        folder = ("A", "B", "label")[i % 3]
        tree[f"{folder}/train_{i // 3:05d}.png"] = rng.randbytes(tile_bytes)
    return tree


def zip_of(tree: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in tree.items():
            archive.writestr(f"dataset/{name}", data)
    return buffer.getvalue()


async def upload(store: S3ObjectStore, bucket: str, tree: dict[str, bytes], archive: bytes) -> None:
    await store.create_bucket(bucket)
    limit = asyncio.Semaphore(32)

    async def put(key: str, data: bytes) -> None:
        async with limit:
            await store.put_bytes(bucket, key, data)

    await asyncio.gather(*(put(f"tiles/{name}", data) for name, data in tree.items()))
    await store.put_bytes(bucket, "archive/dataset.zip", archive)


async def timed_fetch(store: S3ObjectStore, uri: str, cache: Path, concurrency: int) -> dict[str, float]:
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    fetched = await fetch_dataset(store, uri, cache, max_concurrency=concurrency)
    seconds = time.perf_counter() - started
    assert not fetched.from_cache
    return {"seconds": seconds, "mb_s": fetched.bytes / seconds / 1e6, "files": fetched.files, "bytes": fetched.bytes}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tree = make_tree(args.tiles, args.tile_kb * 1024)
    archive = zip_of(tree)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    moto = None
    endpoint = args.endpoint_url
    if endpoint is None:
        moto, endpoint = start_moto(tmp)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    bucket = f"bench-fetch-{uuid.uuid4().hex[:8]}"
    samples: dict[str, list[dict[str, float]]] = {"tiles_serial": [], "tiles_parallel": [], "archive": []}
    cases = {
        "tiles_serial": (f"s3://{bucket}/tiles/", 1),
        "tiles_parallel": (f"s3://{bucket}/tiles/", DEFAULT_CONCURRENCY),
        "archive": (f"s3://{bucket}/archive/dataset.zip", DEFAULT_CONCURRENCY),
    }
    try:
        async with S3ObjectStore(S3Settings(endpoint_url=endpoint)) as store:
            await upload(store, bucket, tree, archive)
            for r in range(args.rounds):
                order = list(cases) if r % 2 == 0 else list(reversed(cases))
                for name in order:
                    uri, concurrency = cases[name]
                    figure = await timed_fetch(store, uri, tmp / "cache", concurrency)
                    samples[name].append(figure)
                    print(f"round {r + 1} {name:15} {figure['mb_s']:6.1f} MB/s  {figure['seconds']:.2f} s",
                          file=sys.stderr, flush=True)
    finally:
        if moto is not None:
            stop_process(moto)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: {k: statistics.median(s[k] for s in runs) for k in ("seconds", "mb_s")}
               for name, runs in samples.items()}
    return {"machine": {"cpu": cpu_model(), "cores": core_count()},
            "endpoint": "moto on loopback" if args.endpoint_url is None else args.endpoint_url,
            "params": {"tiles": args.tiles, "tile_kb": args.tile_kb, "rounds": args.rounds,
                       "parallel": DEFAULT_CONCURRENCY, "dataset_mb": round(sum(map(len, tree.values())) / 1e6, 1)},
            "medians": medians, "samples": samples,
            "parallel_vs_serial": medians["tiles_parallel"]["mb_s"] / medians["tiles_serial"]["mb_s"]}


def report(res: dict[str, Any]) -> str:
    p, m = res["params"], res["medians"]
    lines = [f"dataset fetch from {res['endpoint']}: {p['tiles']} tiles of {p['tile_kb']} KiB ({p['dataset_mb']} MB), "
             f"median of {p['rounds']} rounds; {res['machine']['cpu']}, {res['machine']['cores']} cores",
             "| dataset | MB/s | seconds |", "| --- | ---: | ---: |"]
    for name, label in (("tiles_serial", "prefix, one object at a time"),
                        ("tiles_parallel", f"prefix, {p['parallel']} at a time (the default)"),
                        ("archive", "one zip archive (download + extract)")):
        lines.append(f"| {label} | {m[name]['mb_s']:.1f} | {m[name]['seconds']:.2f} |")
    lines.append(f"parallel/serial: {res['parallel_vs_serial']:.2f}×")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=600, help="objects in the prefix (600)")
    parser.add_argument("--tile-kb", type=int, default=64, help="size of each object in KiB (64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the order (3)")
    parser.add_argument("--endpoint-url", help="an S3 endpoint to use instead of a moto server started here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    res = asyncio.run(run(args))
    print(report(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
