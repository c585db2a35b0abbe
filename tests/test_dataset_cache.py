"""The worker's dataset cache bounded in bytes: least recently used datasets go first, the one in
use never; sizes come from a file written at publish time. Datasets fetched from moto's S3 and the
local store, as the worker fetches them."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from consumer.dataset_cache import DatasetCache
from consumer.dataset_fetch import FetchedDataset, fetch_dataset
from infra.objects import ObjectStore
from tests.test_dataset_fetch import make_zip, put_tree, read_tree

# mtime is what "recently used" means; filesystem clocks tick every few milliseconds.
_TICK_S = 0.05


async def put_dataset(store: ObjectStore, bucket: str, name: str, size: int) -> str:
    """A prefix dataset of ``size`` bytes in two objects; returns its URI."""
    await put_tree(store, bucket, f"{name}/", {"A/a.bin": bytes(size // 2), "B/b.bin": bytes(size - size // 2)})
    return f"s3://{bucket}/{name}/"


async def use(store: ObjectStore, uri: str, cache: DatasetCache) -> FetchedDataset:
    fetched = await fetch_dataset(store, uri, cache)
    await asyncio.sleep(_TICK_S)
    return fetched


def published(cache: DatasetCache) -> dict[str, int]:
    """key -> bytes of every dataset in the cache, from the size files (checked to agree with the tree)."""
    found = {}
    for entry in sorted(cache.datasets.iterdir()):
        size = json.loads((cache.sizes / f"{entry.name}.json").read_text())
        assert size["bytes"] == sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
        found[entry.name] = size["bytes"]
    assert {p.stem for p in cache.sizes.glob("*.json")} == set(found)  # no size file outlives its dataset
    assert list(cache.tmp.iterdir()) == []  # evicted trees are removed, not parked
    return found


def evicted_in_order(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.args[0] for r in caplog.records if r.getMessage().startswith("evicted dataset ")]


async def test_least_recently_used_datasets_are_evicted_first_until_the_cache_fits(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="consumer.dataset_cache")
    cache = DatasetCache(tmp_path / "cache", max_bytes=3000)
    uris = {name: await put_dataset(object_store, store_bucket, name, size)
            for name, size in (("d1", 1000), ("d2", 1000), ("d3", 1000), ("d4", 1000), ("d5", 2000))}
    keys = {}
    for name in ("d1", "d2", "d3"):
        keys[name] = (await use(object_store, uris[name], cache)).etag_key
    assert published(cache) == {keys["d1"]: 1000, keys["d2"]: 1000, keys["d3"]: 1000}  # exactly the bound: kept

    # d1 used again (a cache hit): now d2 is the least recently used.
    again = await use(object_store, uris["d1"], cache)
    assert again.from_cache and evicted_in_order(caplog) == []

    # 1000 more bytes: room is made before the download, for the listed size, by evicting d2 only.
    keys["d4"] = (await use(object_store, uris["d4"], cache)).etag_key
    assert evicted_in_order(caplog) == [keys["d2"]]
    assert published(cache) == {k: 1000 for k in (keys["d1"], keys["d3"], keys["d4"])}

    # 2000 more: d3 then d1 (used before d4) go.
    keys["d5"] = (await use(object_store, uris["d5"], cache)).etag_key
    assert evicted_in_order(caplog) == [keys["d2"], keys["d3"], keys["d1"]]
    sizes = published(cache)
    assert sizes == {keys["d4"]: 1000, keys["d5"]: 2000} and sum(sizes.values()) <= cache.max_bytes

    # An evicted dataset is simply fetched again.
    back = await use(object_store, uris["d2"], cache)
    assert not back.from_cache and read_tree(back.path) == {"A/a.bin": bytes(500), "B/b.bin": bytes(500)}
    assert sum(published(cache).values()) <= cache.max_bytes


async def test_a_held_dataset_survives_though_it_is_the_least_recently_used(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path
) -> None:
    cache = DatasetCache(tmp_path / "cache", max_bytes=2000)
    in_use = await put_dataset(object_store, store_bucket, "in-use", 1000)
    fetched = await fetch_dataset(object_store, in_use, cache, holder="job-1")
    await asyncio.sleep(_TICK_S)
    others = [await put_dataset(object_store, store_bucket, f"o{i}", 1000) for i in range(3)]
    last = None
    for uri in others:
        last = await use(object_store, uri, cache)
    assert last is not None
    # Each new dataset evicted the one before it, never the held one.
    assert set(published(cache)) == {fetched.etag_key, last.etag_key}
    assert read_tree(fetched.path) == {"A/a.bin": bytes(500), "B/b.bin": bytes(500)}

    cache.release("job-1")  # the job ended: now it is just the least recently used
    newest = await use(object_store, others[0], cache)
    assert set(published(cache)) == {last.etag_key, newest.etag_key}


async def test_a_dataset_larger_than_the_whole_cache_still_trains_and_everything_else_goes(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="consumer.dataset_cache")
    cache = DatasetCache(tmp_path / "cache", max_bytes=1500)
    small = [await use(object_store, await put_dataset(object_store, store_bucket, f"s{i}", 500), cache)
             for i in range(3)]
    assert sum(published(cache).values()) == 1500
    big = await fetch_dataset(object_store, await put_dataset(object_store, store_bucket, "big", 4000), cache,
                              holder="job-big")
    assert not big.from_cache and big.bytes == 4000 and big.path.is_dir()
    assert published(cache) == {big.etag_key: 4000}
    assert evicted_in_order(caplog) == [s.etag_key for s in small]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"holds 4,000 bytes (3.9 KiB) for the datasets in use ({big.etag_key[:12]}), over its bound of " \
           "1,500 bytes (1.5 KiB) (CDTRAIN_CACHE_MAX_BYTES); every other dataset was evicted" in warnings[0]


async def test_sizes_are_read_from_the_size_file_not_by_walking_the_tree(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path
) -> None:
    tree = {f"levir/A/{i}.png": bytes(100 + i) for i in range(5)}
    await object_store.put_bytes(store_bucket, "levir.zip", make_zip(tree))
    cache = DatasetCache(tmp_path / "cache", max_bytes=10**6)
    uri = f"s3://{store_bucket}/levir.zip"
    first = await fetch_dataset(object_store, uri, cache)
    size_file = cache.sizes / f"{first.etag_key}.json"
    assert json.loads(size_file.read_text()) == {"files": 5, "bytes": sum(map(len, tree.values()))}

    # A cache hit reports what the size file says (here deliberately not what is on disk).
    size_file.write_text(json.dumps({"files": 7, "bytes": 12345}))
    hit = await fetch_dataset(object_store, uri, cache)
    assert hit.from_cache and (hit.files, hit.bytes) == (7, 12345)

    # A dataset published without one (a crash between the rename and the size file) is measured
    # once, and the size file written.
    size_file.unlink()
    hit = await fetch_dataset(object_store, uri, cache)
    assert (hit.files, hit.bytes) == (first.files, first.bytes)
    assert json.loads(size_file.read_text()) == {"files": first.files, "bytes": first.bytes}


async def test_an_unbounded_cache_evicts_nothing(object_store: ObjectStore, store_bucket: str, tmp_path: Path) -> None:
    cache = DatasetCache(tmp_path / "cache")
    for i in range(3):
        await use(object_store, await put_dataset(object_store, store_bucket, f"u{i}", 1000), cache)
    assert sorted(published(cache).values()) == [1000, 1000, 1000]
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        DatasetCache(tmp_path / "other", max_bytes=-1)
