"""Fetch a training dataset (a prefix of objects, or one archive) and its config into a local cache.

Cache layout under ``cache_dir``::

    datasets/<etag_key>/   complete datasets only: they appear there by one atomic rename
    tmp/<etag_key>.<rnd>/  work in progress; removed on failure, swept when stale after a crash

``etag_key`` hashes what identifies the content (bucket, key or prefix, and the ETags), so an
unchanged dataset is served from disk and a changed one gets a new directory. Archives are
extracted defensively: every member path is checked before anything is written, links are
created last and verified against the real filesystem, and the expanded size is capped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pydantic import BaseModel, ConfigDict

from infra.objects import (
    BucketNotFoundError,
    ObjectInfo,
    ObjectLocation,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    locate_object,
)
from schemas.jobs import ARCHIVE_SUFFIXES  # one definition: the request model uses it too

log = logging.getLogger(__name__)

DEFAULT_MAX_EXTRACTED_BYTES = 64 * 2**30  # LEVIR-CD is ~3 GB; this stops bombs, not datasets
DEFAULT_MAX_ARCHIVE_MEMBERS = 1_000_000
DEFAULT_MAX_CONFIG_BYTES = 1 * 2**20
_STALE_TMP_SECONDS = 24 * 3600
_CHUNK = 1 << 20
_MAX_LINK_TARGET = 4096
_IGNORED_TOP_LEVEL = {"__MACOSX"}  # macOS Finder's resource forks; never part of a dataset


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
    cache_dir: Path,
    *,
    max_concurrency: int = 16,
    max_extracted_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES,
    max_archive_members: int = DEFAULT_MAX_ARCHIVE_MEMBERS,
) -> FetchedDataset:
    """Make the dataset at ``uri`` available under ``cache_dir`` and return where it is.

    ``uri`` naming a key that ends in .zip, .tar.gz or .tgz is one archive; anything else
    is a prefix (a trailing '/' is implied, so ``levir`` never picks up ``levir2/``).
    """
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be at least 1")
    location = _locate(uri, "dataset_uri")
    cache = _CacheDirs(Path(cache_dir))
    await asyncio.to_thread(cache.prepare)
    if _archive_suffix(location.key):
        return await _fetch_archive(
            store, location, cache, max_bytes=max_extracted_bytes, max_members=max_archive_members
        )
    return await _fetch_prefix(store, location, cache, max_concurrency=max_concurrency)


async def fetch_config(
    store: ObjectStore, uri: str | ObjectLocation, *, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES
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
        raise DatasetFetchError(
            f"config {location} is {size} bytes, over the {max_bytes}-byte limit — is config_uri "
            "pointing at the right file?"
        )


def _locate(uri: str | ObjectLocation, field: str) -> ObjectLocation:
    if isinstance(uri, ObjectLocation):
        return uri
    try:
        return locate_object(uri)
    except ValueError as exc:
        raise DatasetFetchError(f"invalid {field}: {exc}") from None


def _archive_suffix(key: str) -> str | None:
    lowered = key.lower()
    return next((s for s in ARCHIVE_SUFFIXES if lowered.endswith(s)), None)


# --- cache directories -----------------------------------------------------------------------


class _CacheDirs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.datasets = root / "datasets"
        self.tmp = root / "tmp"

    def prepare(self) -> None:
        self.datasets.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._sweep_stale()

    def _sweep_stale(self) -> None:
        # A crashed fetch leaves its temp dir behind; a day-old one is certainly not in use.
        cutoff = time.time() - _STALE_TMP_SECONDS
        for entry in self.tmp.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                continue

    def final(self, etag_key: str) -> Path:
        return self.datasets / etag_key

    def new_work_dir(self, etag_key: str) -> Path:
        return Path(tempfile.mkdtemp(dir=self.tmp, prefix=f"{etag_key[:16]}."))


def _publish(work: Path, final: Path) -> bool:
    """Rename ``work`` to ``final``; False when another fetch published the same key first."""
    try:
        os.rename(work, final)
        return True
    except OSError:
        if final.is_dir():
            return False
        raise


def _etag_key(payload: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _touch(path: Path) -> None:
    # Lets an external cleaner evict least-recently-used datasets by mtime.
    try:
        os.utime(path)
    except OSError:
        pass


# --- a prefix of objects ---------------------------------------------------------------------


async def _fetch_prefix(
    store: ObjectStore, location: ObjectLocation, cache: _CacheDirs, *, max_concurrency: int
) -> FetchedDataset:
    prefix = location.key if not location.key or location.key.endswith("/") else location.key + "/"
    shown = _with_key(location, prefix)
    try:
        listed = await store.list(location.bucket, prefix)
    except BucketNotFoundError:
        raise DatasetFetchError(f"bucket '{location.bucket}' does not exist ({shown}) — check dataset_uri") from None
    except ObjectStoreError as exc:
        raise DatasetFetchError(f"could not list {shown}: {exc}") from exc
    # Keys ending in '/' are folder markers made by consoles, not files.
    objects = [o for o in listed if not o.key.endswith("/")]
    if not objects:
        raise DatasetFetchError(f"no objects under {shown} — check dataset_uri")
    plan = _plan_prefix_files(objects, prefix)

    etag_key = _etag_key(
        {"kind": "prefix", "bucket": location.bucket, "prefix": prefix,
         "objects": sorted([o.key, o.etag] for o in objects)}
    )
    total = sum(o.size for o in objects)
    final = cache.final(etag_key)
    if final.is_dir():
        _touch(final)
        return FetchedDataset(path=final, etag_key=etag_key, files=len(objects), bytes=total, from_cache=True)

    log.info("downloading %d objects (%d bytes) from %s", len(objects), total, shown)
    work = await asyncio.to_thread(cache.new_work_dir, etag_key)
    try:
        data = work / "data"
        await asyncio.to_thread(_make_parent_dirs, data, plan)
        await _download_all(store, location.bucket, plan, data, max_concurrency)
        if not await asyncio.to_thread(_publish, data, final):
            log.info("%s was published by a concurrent fetch; using it", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return FetchedDataset(path=final, etag_key=etag_key, files=len(objects), bytes=total, from_cache=False)


def _with_key(location: ObjectLocation, key: str) -> ObjectLocation:
    return ObjectLocation(location.store, location.bucket, key, location.root_dir)


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
                await _download_one(store, bucket, obj, dest_root / rel)
            except BaseException:
                failed.set()
                raise

    results = await asyncio.gather(*(worker() for _ in range(min(max_concurrency, len(plan)))),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise next((e for e in errors if isinstance(e, DatasetFetchError)), errors[0])


async def _download_one(store: ObjectStore, bucket: str, obj: ObjectInfo, dest: Path) -> None:
    where = f"s3://{bucket}/{obj.key}"
    try:
        got = await store.download_file(bucket, obj.key, dest)
    except ObjectNotFoundError:
        raise DatasetFetchError(
            f"{where} was deleted while the dataset was downloading — retry once the upload is complete"
        ) from None
    except ObjectStoreError as exc:
        raise DatasetFetchError(f"could not download {where}: {exc}") from exc
    except OSError as exc:  # local disk full, a connection dropped mid-copy, ...
        raise DatasetFetchError(f"could not download {where} to {dest}: {exc}") from exc
    if got.etag != obj.etag or got.size != obj.size:
        raise DatasetFetchError(
            f"{where} changed while the dataset was downloading (ETag {obj.etag} -> {got.etag}) — "
            "retry once the upload is complete"
        )


# --- one archive -----------------------------------------------------------------------------


async def _fetch_archive(
    store: ObjectStore, location: ObjectLocation, cache: _CacheDirs, *, max_bytes: int, max_members: int
) -> FetchedDataset:
    suffix = _archive_suffix(location.key)
    assert suffix is not None
    try:
        info = await store.head(location.bucket, location.key)
    except ObjectStoreError as exc:
        raise DatasetFetchError(f"could not read {location}: {exc}") from exc
    if info is None:
        raise DatasetFetchError(f"no object at {location} — check dataset_uri")

    etag_key = _etag_key({"kind": "archive", "bucket": location.bucket, "key": location.key, "etag": info.etag})
    final = cache.final(etag_key)
    if final.is_dir():
        _touch(final)
        files, size = await asyncio.to_thread(_count_tree, final)
        root = await asyncio.to_thread(_dataset_root, final)
        return FetchedDataset(path=root, etag_key=etag_key, files=files, bytes=size, from_cache=True)

    log.info("downloading archive %s (%d bytes)", location, info.size)
    work = await asyncio.to_thread(cache.new_work_dir, etag_key)
    try:
        archive = work / f"archive{suffix}"
        await _download_one(store, location.bucket, info, archive)
        data = work / "data"
        limits = _Limits(max_bytes=max_bytes, max_members=max_members)
        files, size = await asyncio.to_thread(_extract, archive, suffix, data, limits, str(location))
        if not await asyncio.to_thread(_publish, data, final):
            log.info("%s was published by a concurrent fetch; using it", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    root = await asyncio.to_thread(_dataset_root, final)
    return FetchedDataset(path=root, etag_key=etag_key, files=files, bytes=size, from_cache=False)


def _dataset_root(extracted: Path) -> Path:
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return extracted


def _count_tree(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size


# --- safe extraction (runs in a worker thread) -----------------------------------------------


@dataclass(frozen=True)
class _Limits:
    max_bytes: int
    max_members: int


class _Extractor:
    """Writes members under ``root``; files and dirs first, links last (see ``finish``)."""

    def __init__(self, root: Path, limits: _Limits, source: str) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.limits = limits
        self.source = source
        self.members = 0
        self.files: set[PurePosixPath] = set()
        self.reserved = 0  # counted against max_bytes: declared sizes, or more if they lie
        self.bytes = 0  # actually written
        self.symlinks: list[tuple[str, PurePosixPath, str]] = []

    def member_path(self, name: str) -> PurePosixPath | None:
        """The checked relative path of a member, or None for members to skip."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise DatasetFetchError(
                f"archive {self.source} has more than {self.limits.max_members} members "
                "(limit max_archive_members) — split it or raise the limit"
            )
        return _safe_relative(name, what="archive member")

    def add_dir(self, rel: PurePosixPath) -> None:
        target = self.root / rel
        if target.is_file():
            raise DatasetFetchError(f"archive member '{rel}/' conflicts with a file of the same name")
        target.mkdir(parents=True, exist_ok=True)

    def add_file(self, name: str, rel: PurePosixPath, reader: BinaryIO, declared_size: int) -> None:
        self.reserve(declared_size)
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        try:
            with open(target, "wb") as writer:
                while chunk := reader.read(_CHUNK):
                    written += len(chunk)
                    if written > declared_size:
                        # The header lied (a classic bomb trick): count what really arrives.
                        self.reserve(len(chunk))
                    writer.write(chunk)
        except IsADirectoryError:
            raise DatasetFetchError(f"archive member '{name}' conflicts with a directory of the same name") from None
        self.bytes += written
        self.files.add(rel)

    def add_hardlink(self, name: str, rel: PurePosixPath, link_name: str) -> None:
        try:
            source = _safe_relative(link_name, what="link target")
        except DatasetFetchError:
            raise DatasetFetchError(
                f"archive member '{name}' is a hardlink pointing outside the extraction directory "
                f"('{link_name}')"
            ) from None
        if source is None or source == rel or source not in self.files:
            raise DatasetFetchError(
                f"archive member '{name}' is a hardlink to '{link_name}', which is not a file "
                "earlier in the archive"
            )
        # Copy rather than link: the cache must not share inodes with anything else.
        with open(self.root / source, "rb") as reader:
            self.add_file(name, rel, reader, (self.root / source).stat().st_size)

    def add_symlink(self, name: str, rel: PurePosixPath, target: str) -> None:
        if not target:
            raise DatasetFetchError(f"archive member '{name}' is a symlink with an empty target")
        if _is_absolute(target):
            raise DatasetFetchError(
                f"archive member '{name}' is a symlink to an absolute path ('{target}'); only "
                "relative links inside the archive are allowed"
            )
        lexical = os.path.normpath(os.path.join(str(rel.parent), target))
        if lexical == ".." or lexical.startswith("../"):
            raise _symlink_escape(name, target)
        self.symlinks.append((name, rel, target))

    def finish(self) -> None:
        """Create the symlinks, then check each one against the real filesystem.

        Links are made after every file so no write can go through one; the final check uses
        realpath because chains of individually harmless links can still climb out.
        """
        for name, rel, target in self.symlinks:
            parent = self.root / rel.parent
            if not self._inside(os.path.realpath(parent)):
                raise _symlink_escape(name, target)
            parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(target, self.root / rel)
            except FileExistsError:
                raise DatasetFetchError(f"archive member '{name}' conflicts with another member of the same name") from None
        for name, rel, target in self.symlinks:
            if not self._inside(os.path.realpath(self.root / rel)):
                raise _symlink_escape(name, target)

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def reserve(self, size: int) -> None:
        self.reserved += size
        self.check_total(self.reserved)

    def check_total(self, total: int) -> None:
        if total > self.limits.max_bytes:
            raise DatasetFetchError(
                f"archive {self.source} expands to more than {self.limits.max_bytes} bytes "
                "(limit max_extracted_bytes) — it may be a zip bomb; if the dataset really is "
                "that large, raise the limit"
            )


def _symlink_escape(name: str, target: str) -> DatasetFetchError:
    return DatasetFetchError(
        f"archive member '{name}' is a symlink pointing outside the extraction directory ('{target}')"
    )


def _safe_relative(name: str, *, what: str) -> PurePosixPath | None:
    normalised = name.replace("\\", "/")  # Windows tools sometimes write backslashes
    if "\x00" in name:
        raise DatasetFetchError(f"{what} {name!r} contains a NUL byte")
    if _is_absolute(normalised):
        raise DatasetFetchError(
            f"{what} '{name}' has an absolute path — archives must hold relative paths"
        )
    parts = [p for p in normalised.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DatasetFetchError(f"{what} '{name}' escapes the extraction directory ('..' in its path)")
    if not parts or parts[0] in _IGNORED_TOP_LEVEL:
        return None
    return PurePosixPath(*parts)


def _is_absolute(path: str) -> bool:
    normalised = path.replace("\\", "/")
    return normalised.startswith("/") or re.match(r"^[A-Za-z]:/", normalised) is not None


def _extract(archive: Path, suffix: str, dest: Path, limits: _Limits, source: str) -> tuple[int, int]:
    dest.mkdir()
    extractor = _Extractor(dest, limits, source)
    run: Callable[[Path, _Extractor], None] = _extract_zip if suffix == ".zip" else _extract_tar
    try:
        run(archive, extractor)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise DatasetFetchError(f"archive {source} is corrupt or not a {suffix} file: {exc}") from None
    except NotImplementedError as exc:  # e.g. a zip compression method Python lacks
        raise DatasetFetchError(f"archive {source} uses an unsupported feature: {exc}") from None
    except OSError as exc:
        raise DatasetFetchError(f"could not extract archive {source}: {exc.strerror or exc} ({exc.filename})") from None
    extractor.finish()
    if not extractor.files:
        raise DatasetFetchError(f"archive {source} contains no files")
    return len(extractor.files), extractor.bytes


def _extract_zip(archive: Path, extractor: _Extractor) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # Fail fast on the declared total, before writing anything; add_file still counts the
        # real bytes in case the headers lie.
        extractor.check_total(sum(i.file_size for i in infos))
        for info in infos:
            rel = extractor.member_path(info.filename)
            if rel is None:
                continue
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if info.is_dir() or kind == stat.S_IFDIR:
                extractor.add_dir(rel)
            elif kind == stat.S_IFLNK:
                if info.file_size > _MAX_LINK_TARGET:
                    raise DatasetFetchError(f"archive member '{info.filename}' is a symlink with an oversized target")
                extractor.add_symlink(info.filename, rel, zf.read(info).decode("utf-8", "replace"))
            elif kind not in (0, stat.S_IFREG):
                raise _special_file(info.filename)
            elif info.flag_bits & 0x1:
                raise DatasetFetchError(f"archive member '{info.filename}' is encrypted — upload an unencrypted archive")
            else:
                with zf.open(info) as reader:
                    extractor.add_file(info.filename, rel, reader, info.file_size)


def _extract_tar(archive: Path, extractor: _Extractor) -> None:
    # Stream mode ("r|*"): one sequential pass, no seeking through a gzip stream.
    with tarfile.open(archive, mode="r|*") as tf:
        for member in tf:
            rel = extractor.member_path(member.name)
            if rel is None:
                continue
            if member.isdir():
                extractor.add_dir(rel)
            elif member.isreg():
                reader = tf.extractfile(member)
                assert reader is not None
                extractor.add_file(member.name, rel, reader, member.size)
            elif member.issym():
                extractor.add_symlink(member.name, rel, member.linkname)
            elif member.islnk():
                extractor.add_hardlink(member.name, rel, member.linkname)
            else:
                raise _special_file(member.name)


def _special_file(name: str) -> DatasetFetchError:
    return DatasetFetchError(
        f"archive member '{name}' is a device or other special file; dataset archives may hold "
        "only files, directories and links"
    )
