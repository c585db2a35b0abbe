"""An object store on a local directory: the embedded default, and the twin the tests run against.

Layout: ``root_dir/<bucket>/<key>``. ETags are the MD5 of the content, like S3's for single-part
uploads, so cache keys behave the same on both stores. File I/O runs in worker threads so the
event loop keeps serving while large files are copied or hashed.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from infra.objects.errors import BucketNotFoundError, ObjectNotFoundError, ObjectStoreError
from infra.objects.models import ObjectInfo

_CHUNK = 1 << 20
_PART_SUFFIX = ".cdtrain-part"  # in-progress writes; hidden from list()
_ETAG_CACHE_LIMIT = 200_000


class LocalObjectStore:
    def __init__(self, root_dir: Path | str) -> None:
        self.root_dir = Path(root_dir)
        # (path, size, mtime_ns) -> md5; hashing every file on every list would be slow.
        self._etag_cache: dict[tuple[str, int, int], str] = {}

    async def __aenter__(self) -> "LocalObjectStore":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        return None

    # --- paths ------------------------------------------------------------------------------

    def _bucket_dir(self, bucket: str) -> Path:
        if not bucket or "/" in bucket or bucket in (".", ".."):
            raise ObjectStoreError(f"invalid bucket name {bucket!r} for the local store")
        return self.root_dir / bucket

    def _object_path(self, bucket: str, key: str) -> Path:
        # Keys become paths, so refuse anything that would leave the bucket directory.
        parts = key.split("/")
        if not key or key.endswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ObjectStoreError(
                f"key {key!r} is not usable in the local store (empty, '.' or '..' segment, "
                "or a trailing '/')"
            )
        return self._bucket_dir(bucket).joinpath(*parts)

    def _existing_bucket(self, bucket: str) -> Path:
        path = self._bucket_dir(bucket)
        if not path.is_dir():
            raise BucketNotFoundError(bucket)
        return path

    # --- reads ------------------------------------------------------------------------------

    async def get_bytes(self, bucket: str, key: str) -> bytes:
        path = self._object_path(bucket, key)
        self._existing_bucket(bucket)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(bucket, key) from None

    async def head(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            path = self._object_path(bucket, key)
        except ObjectStoreError:
            return None
        if not path.is_file():
            return None
        return await asyncio.to_thread(self._info, bucket, key, path)

    async def list(self, bucket: str, prefix: str = "", *, page_size: int = 1000) -> list[ObjectInfo]:
        # page_size only matters to paged backends; accepted so callers stay backend-agnostic.
        bucket_dir = self._existing_bucket(bucket)
        return await asyncio.to_thread(self._list_sync, bucket, bucket_dir, prefix)

    def _list_sync(self, bucket: str, bucket_dir: Path, prefix: str) -> list[ObjectInfo]:
        # Walk only the directory the prefix names, and below it only sub-directories that can
        # still hold matching keys, not the whole bucket.
        start_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = bucket_dir.joinpath(*start_rel.split("/")) if start_rel else bucket_dir
        if not start.is_dir():
            return []
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = Path(dirpath).relative_to(bucket_dir).as_posix()
            base = "" if rel_dir == "." else rel_dir + "/"
            dirnames[:] = [
                d for d in dirnames
                if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")
            ]
            for name in filenames:
                if name.endswith(_PART_SUFFIX):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(bucket_dir).as_posix()
                if key.startswith(prefix) and path.is_file():
                    found.append(self._info(bucket, key, path))
        found.sort(key=lambda info: info.key.encode())  # S3 orders keys by UTF-8 bytes
        return found

    def _info(self, bucket: str, key: str, path: Path) -> ObjectInfo:
        stat = path.stat()
        cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
        etag = self._etag_cache.get(cache_key)
        if etag is None:
            etag = _md5_file(path)
            if len(self._etag_cache) >= _ETAG_CACHE_LIMIT:
                self._etag_cache.clear()  # stale entries pile up as files are rewritten
            self._etag_cache[cache_key] = etag
        return ObjectInfo(
            bucket=bucket,
            key=key,
            size=stat.st_size,
            etag=etag,
            last_modified=datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc),
        )

    async def download_file(self, bucket: str, key: str, dest_path: Path) -> ObjectInfo:
        src = self._object_path(bucket, key)
        self._existing_bucket(bucket)
        return await asyncio.to_thread(self._copy_sync, bucket, key, src, Path(dest_path))

    def _copy_sync(self, bucket: str, key: str, src: Path, dest: Path) -> ObjectInfo:
        try:
            reader = src.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(bucket, key) from None
        with reader:
            # Hash what is copied, so the ETag describes exactly the bytes now at dest.
            etag, size = _write_atomically(dest, reader)
            stat = os.fstat(reader.fileno())
        return ObjectInfo(
            bucket=bucket,
            key=key,
            size=size,
            etag=etag,
            last_modified=datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc),
        )

    # --- writes -----------------------------------------------------------------------------

    async def create_bucket(self, bucket: str) -> None:
        await asyncio.to_thread(self._bucket_dir(bucket).mkdir, parents=True, exist_ok=True)

    async def put_bytes(self, bucket: str, key: str, data: bytes) -> ObjectInfo:
        path = self._object_path(bucket, key)
        self._existing_bucket(bucket)
        return await asyncio.to_thread(self._put_sync, bucket, key, path, data)

    def _put_sync(self, bucket: str, key: str, path: Path, data: bytes) -> ObjectInfo:
        _write_atomically(path, io.BytesIO(data))
        return self._info(bucket, key, path)

    async def upload_file(self, bucket: str, key: str, src_path: Path) -> ObjectInfo:
        path = self._object_path(bucket, key)
        self._existing_bucket(bucket)
        return await asyncio.to_thread(self._upload_sync, bucket, key, path, Path(src_path))

    def _upload_sync(self, bucket: str, key: str, path: Path, src: Path) -> ObjectInfo:
        with src.open("rb") as reader:
            _write_atomically(path, reader)
        return self._info(bucket, key, path)


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(dest: Path, reader: BinaryIO) -> tuple[str, int]:
    """Copy ``reader`` to ``dest`` via a temp file + rename; return (md5 hex, size)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=_PART_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as writer:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                writer.write(chunk)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size

