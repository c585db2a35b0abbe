"""Fetch a training dataset (a prefix of objects, or one archive) and its config into a local cache.

The cache (consumer/dataset_cache.py) keeps complete datasets only, each under a key that hashes
what identifies the content (bucket, key or prefix, and the ETags), so an unchanged dataset is
served from disk and a changed one gets a new directory; it is bounded in bytes, least recently
used first out. Archives are extracted by consumer/archive_extract.py.

Every size is checked against the worker's limits (consumer/limits.py) as early as it is known:
a prefix's object count and bytes from its listing and an archive's size from its HEAD, before
anything is downloaded; what arrives, and what an archive expands to, while it happens. Past a
limit the fetch fails with the measured size, the limit and the variable that raises it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict

from consumer.archive_extract import (
    ArchiveError,
    ArchiveLimitError,
    ExtractedArchive,
    archive_suffix,
    extract_archive,
)
from consumer.dataset_cache import DatasetCache, DatasetSize
from consumer.limits import DatasetLimits, format_bytes, over_limit
from infra.objects import (
    BucketNotFoundError,
    ObjectInfo,
    ObjectLocation,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    locate_object,
)

log = logging.getLogger(__name__)

DEFAULT_LIMITS = DatasetLimits()
_SPLIT_ADVICE = "split the dataset or raise the limit"


class DatasetFetchError(Exception):
    """The dataset or config cannot be fetched; the message says what to fix."""


class FetchedDataset(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path  # the dataset root (an archive's single top-level directory when it has one)
    etag_key: str
    files: int
    bytes: int  # bytes on disk: object sizes for a prefix, extracted sizes for an archive
    from_cache: bool


# --- public entry points ----------------------------------------------------------------------


async def fetch_dataset(
    store: ObjectStore,
    uri: str | ObjectLocation,
    cache: Path | DatasetCache,
    *,
    limits: DatasetLimits = DEFAULT_LIMITS,
    max_concurrency: int = 16,
    holder: str | None = None,
) -> FetchedDataset:
    """Make the dataset at ``uri`` available in ``cache`` and return where it is.

    ``uri`` naming a key that ends in .zip, .tar.gz or .tgz is one archive; anything else
    is a prefix (a trailing '/' is implied, so ``levir`` never picks up ``levir2/``).
    ``cache``: a directory is an unbounded cache there. ``holder`` (a job) holds the dataset in
    the cache, safe from eviction, until ``cache.release(holder)``.
    """
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be at least 1")
    location = _locate(uri, "dataset_uri")
    cache = cache if isinstance(cache, DatasetCache) else DatasetCache(Path(cache))
    await asyncio.to_thread(cache.prepare)
    fetch = _Fetch(store, cache, limits, holder)
    if archive_suffix(location.key):
        return await fetch.archive(location)
    return await fetch.prefix(location, max_concurrency)


async def fetch_config(
    store: ObjectStore, uri: str | ObjectLocation, *, max_bytes: int = DEFAULT_LIMITS.max_config_bytes
) -> str:
    """Return the text of the YAML config at ``uri`` (not parsed: the caller validates it)."""
    location = _locate(uri, "config_uri")
    if not location.key or location.key.endswith("/"):
        raise DatasetFetchError(f"config_uri {location} names a prefix, not a file — point it at a .yaml object")
    try:
        info = await store.head(location.bucket, location.key)
        if info is None:
            raise ObjectNotFoundError(location.bucket, location.key)
        _check_config_size(location, info.size, max_bytes)
        data = await store.get_bytes(location.bucket, location.key)
    except ObjectNotFoundError:
        raise DatasetFetchError(f"no config at {location} — check config_uri") from None
    except ObjectStoreError as exc:
        raise DatasetFetchError(f"could not read config {location}: {exc}") from exc
    _check_config_size(location, len(data), max_bytes)  # it may have grown since HEAD
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetFetchError(f"config {location} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _check_config_size(location: ObjectLocation, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise DatasetFetchError(over_limit("max_config_bytes", f"config {location} is", format_bytes(size),
                                           format_bytes(max_bytes), "is config_uri pointing at the right file?"))


def _locate(uri: str | ObjectLocation, field: str) -> ObjectLocation:
    if isinstance(uri, ObjectLocation):
        return uri
    try:
        return locate_object(uri)
    except ValueError as exc:
        raise DatasetFetchError(f"invalid {field}: {exc}") from None


def _etag_key(payload: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _with_key(location: ObjectLocation, key: str) -> ObjectLocation:
    return ObjectLocation(location.store, location.bucket, key, location.root_dir)


class _Fetch:
    """One fetch: a prefix or an archive into the cache, within the limits."""

    def __init__(self, store: ObjectStore, cache: DatasetCache, limits: DatasetLimits, holder: str | None) -> None:
        self.store = store
        self.cache = cache
        self.limits = limits
        self.holder = holder

    async def _cached(self, etag_key: str) -> DatasetSize | None:
        """Hold ``etag_key`` (before any eviction can see it) and look it up."""
        if self.holder is not None:
            self.cache.hold(self.holder, etag_key)
        return await asyncio.to_thread(self.cache.lookup, etag_key)

    # --- a prefix of objects -------------------------------------------------------------------

    async def prefix(self, location: ObjectLocation, max_concurrency: int) -> FetchedDataset:
        prefix = location.key if not location.key or location.key.endswith("/") else location.key + "/"
        shown = _with_key(location, prefix)
        try:
            listed = await self.store.list(location.bucket, prefix)
        except BucketNotFoundError:
            raise DatasetFetchError(
                f"bucket '{location.bucket}' does not exist ({shown}) — check dataset_uri") from None
        except ObjectStoreError as exc:
            raise DatasetFetchError(f"could not list {shown}: {exc}") from exc
        # Keys ending in '/' are folder markers made by consoles, not files.
        objects = [o for o in listed if not o.key.endswith("/")]
        if not objects:
            raise DatasetFetchError(f"no objects under {shown} — check dataset_uri")
        total = sum(o.size for o in objects)
        self._check_listing(shown, len(objects), total)
        plan = _plan_prefix_files(objects, prefix)

        etag_key = _etag_key(
            {"kind": "prefix", "bucket": location.bucket, "prefix": prefix,
             "objects": sorted([o.key, o.etag] for o in objects)}
        )
        final = self.cache.final(etag_key)
        if await self._cached(etag_key) is not None:
            await asyncio.to_thread(self.cache.evict, etag_key)
            return FetchedDataset(path=final, etag_key=etag_key, files=len(objects), bytes=total, from_cache=True)

        await asyncio.to_thread(self.cache.make_room, total, etag_key)
        log.info("downloading %d objects (%d bytes) from %s", len(objects), total, shown)
        work = await asyncio.to_thread(self.cache.new_work_dir, etag_key)
        try:
            data = work / "data"
            await asyncio.to_thread(_make_parent_dirs, data, plan)
            await _download_all(self.store, location.bucket, plan, data, max_concurrency)
            size = DatasetSize(files=len(objects), bytes=total)
            if not await asyncio.to_thread(self.cache.publish, data, etag_key, size):
                log.info("%s was published by a concurrent fetch; using it", final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        await asyncio.to_thread(self.cache.evict, etag_key)
        return FetchedDataset(path=final, etag_key=etag_key, files=len(objects), bytes=total, from_cache=False)

    def _check_listing(self, shown: ObjectLocation, count: int, total: int) -> None:
        if count > self.limits.max_dataset_objects:
            raise DatasetFetchError(over_limit("max_dataset_objects", f"dataset {shown} holds", f"{count:,} objects",
                                               f"{self.limits.max_dataset_objects:,}", _SPLIT_ADVICE))
        if total > self.limits.max_dataset_bytes:
            raise DatasetFetchError(over_limit("max_dataset_bytes", f"dataset {shown} holds", format_bytes(total),
                                               format_bytes(self.limits.max_dataset_bytes), _SPLIT_ADVICE))

    # --- one archive ---------------------------------------------------------------------------

    async def archive(self, location: ObjectLocation) -> FetchedDataset:
        suffix = archive_suffix(location.key)
        assert suffix is not None
        try:
            info = await self.store.head(location.bucket, location.key)
        except ObjectStoreError as exc:
            raise DatasetFetchError(f"could not read {location}: {exc}") from exc
        if info is None:
            raise DatasetFetchError(f"no object at {location} — check dataset_uri")
        self._check_archive_size(location, info.size, "is")

        etag_key = _etag_key({"kind": "archive", "bucket": location.bucket, "key": location.key, "etag": info.etag})
        final = self.cache.final(etag_key)
        cached = await self._cached(etag_key)
        if cached is not None:
            await asyncio.to_thread(self.cache.evict, etag_key)
            root = await asyncio.to_thread(_dataset_root, final)
            return FetchedDataset(path=root, etag_key=etag_key, files=cached.files, bytes=cached.bytes,
                                  from_cache=True)

        # The extracted size is not known yet; the archive's is a fair first guess.
        await asyncio.to_thread(self.cache.make_room, info.size, etag_key)
        log.info("downloading archive %s (%d bytes)", location, info.size)
        work = await asyncio.to_thread(self.cache.new_work_dir, etag_key)
        try:
            archive = work / f"archive{suffix}"
            got = await _download(self.store, location.bucket, info.key, archive)
            self._check_archive_size(location, got.size, "arrived as")  # replaced since HEAD?
            _check_unchanged(f"s3://{location.bucket}/{info.key}", info, got)
            data = work / "data"
            extracted = await asyncio.to_thread(self._extract, archive, suffix, data, str(location))
            size = DatasetSize(files=extracted.files, bytes=extracted.bytes)
            if not await asyncio.to_thread(self.cache.publish, data, etag_key, size):
                log.info("%s was published by a concurrent fetch; using it", final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        await asyncio.to_thread(self.cache.evict, etag_key)
        root = await asyncio.to_thread(_dataset_root, final)
        return FetchedDataset(path=root, etag_key=etag_key, files=size.files, bytes=size.bytes, from_cache=False)

    def _check_archive_size(self, location: ObjectLocation, size: int, verb: str) -> None:
        if size > self.limits.max_archive_bytes:
            raise DatasetFetchError(over_limit("max_archive_bytes", f"archive {location} {verb}", format_bytes(size),
                                               format_bytes(self.limits.max_archive_bytes), _SPLIT_ADVICE))

    def _extract(self, archive: Path, suffix: str, dest: Path, source: str) -> ExtractedArchive:
        try:
            return extract_archive(archive, suffix, dest, max_bytes=self.limits.max_extracted_bytes,
                                   max_members=self.limits.max_archive_members, source=source)
        except ArchiveLimitError as exc:
            at_least = "at least " if exc.at_least else ""
            if exc.limit == "max_extracted_bytes":
                message = over_limit(exc.limit, f"archive {source} expands to", at_least + format_bytes(exc.measured),
                                     format_bytes(exc.maximum), "it may be a zip bomb; if the dataset really is "
                                     "that large, raise the limit")
            else:
                message = over_limit(exc.limit, f"archive {source} has", f"{at_least}{exc.measured:,} members",
                                     f"{exc.maximum:,}", "split it or raise the limit")
            raise DatasetFetchError(message) from None
        except ArchiveError as exc:
            raise DatasetFetchError(str(exc)) from None


def _dataset_root(extracted: Path) -> Path:
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return extracted


def _plan_prefix_files(objects: list[ObjectInfo], prefix: str) -> list[tuple[ObjectInfo, PurePosixPath]]:
    """Map each object to its path relative to the prefix, refusing keys that are not safe paths."""
    plan: list[tuple[ObjectInfo, PurePosixPath]] = []
    for obj in objects:
        relative = obj.key[len(prefix):]
        parts = relative.split("/")
        if "\x00" in relative or any(p in ("", ".", "..") for p in parts):
            raise DatasetFetchError(
                f"object key '{obj.key}' cannot be stored as a file (empty, '.' or '..' path "
                "segment) — rename it or remove it from the dataset"
            )
        plan.append((obj, PurePosixPath(*parts)))
    files = {rel for _, rel in plan}
    for _, rel in plan:
        for parent in rel.parents:
            if parent in files:
                raise DatasetFetchError(
                    f"object key '{prefix}{parent}' is both a file and a folder of '{prefix}{rel}' — "
                    "rename one of them"
                )
    return plan


def _make_parent_dirs(root: Path, plan: list[tuple[ObjectInfo, PurePosixPath]]) -> None:
    root.mkdir()
    for parent in {rel.parent for _, rel in plan}:
        (root / parent).mkdir(parents=True, exist_ok=True)


async def _download_all(
    store: ObjectStore,
    bucket: str,
    plan: list[tuple[ObjectInfo, PurePosixPath]],
    dest_root: Path,
    max_concurrency: int,
) -> None:
    # A fixed pool of workers over one iterator bounds concurrency without one task per file
    # (a tiled LEVIR-CD is tens of thousands of objects). After a failure the others finish the
    # object in hand and stop: a cancelled download would go on in its thread and write into a
    # work directory already removed.
    pending: Iterator[tuple[ObjectInfo, PurePosixPath]] = iter(plan)
    failed = asyncio.Event()

    async def worker() -> None:
        for obj, rel in pending:
            if failed.is_set():
                return
            try:
                got = await _download(store, bucket, obj.key, dest_root / rel)
                _check_unchanged(f"s3://{bucket}/{obj.key}", obj, got)
            except BaseException:
                failed.set()
                raise

    results = await asyncio.gather(*(worker() for _ in range(min(max_concurrency, len(plan)))),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise next((e for e in errors if isinstance(e, DatasetFetchError)), errors[0])


async def _download(store: ObjectStore, bucket: str, key: str, dest: Path) -> ObjectInfo:
    where = f"s3://{bucket}/{key}"
    try:
        return await store.download_file(bucket, key, dest)
    except ObjectNotFoundError:
        raise DatasetFetchError(
            f"{where} was deleted while the dataset was downloading — retry once the upload is complete"
        ) from None
    except ObjectStoreError as exc:
        raise DatasetFetchError(f"could not download {where}: {exc}") from exc
    except OSError as exc:  # local disk full, a connection dropped mid-copy, ...
        raise DatasetFetchError(f"could not download {where} to {dest}: {exc}") from exc


def _check_unchanged(where: str, listed: ObjectInfo, got: ObjectInfo) -> None:
    if got.etag != listed.etag or got.size != listed.size:
        raise DatasetFetchError(
            f"{where} changed while the dataset was downloading (ETag {listed.etag} -> {got.etag}) — "
            "retry once the upload is complete"
        )
