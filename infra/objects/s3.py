"""The S3 object store (AWS, MinIO, moto) over aioboto3.

One aioboto3 client is opened on first use and reused for every call (its connection pool is
what makes parallel GETs cheap); ``close()`` or ``async with`` releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from infra.objects.errors import BucketNotFoundError, ObjectNotFoundError, ObjectStoreError
from infra.objects.models import ObjectInfo, S3Settings

_CHUNK = 1 << 20
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


class S3ObjectStore:
    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._session = aioboto3.Session(
            aws_access_key_id=_secret(settings.access_key_id),
            aws_secret_access_key=_secret(settings.secret_access_key),
            aws_session_token=_secret(settings.session_token),
            region_name=settings.region,
        )
        self._client: Any = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._open_lock = asyncio.Lock()

    async def __aenter__(self) -> "S3ObjectStore":
        await self._get_client()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        async with self._open_lock:
            if self._exit_stack is not None:
                stack, self._exit_stack, self._client = self._exit_stack, None, None
                await stack.aclose()

    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._open_lock:
            if self._client is None:
                settings = self.settings
                config = AioConfig(
                    s3={"addressing_style": settings.addressing_style},
                    retries={"max_attempts": settings.max_attempts, "mode": "standard"},
                    max_pool_connections=settings.max_pool_connections,
                    connect_timeout=settings.connect_timeout_s,
                    read_timeout=settings.read_timeout_s,
                )
                stack = contextlib.AsyncExitStack()
                self._client = await stack.enter_async_context(
                    self._session.client("s3", endpoint_url=settings.endpoint_url, config=config)
                )
                self._exit_stack = stack
        return self._client

    # --- reads ------------------------------------------------------------------------------

    async def get_bytes(self, bucket: str, key: str) -> bytes:
        client = await self._get_client()
        try:
            response = await client.get_object(Bucket=bucket, Key=key)
            stream = response["Body"]
            async with stream:  # returns the connection to the pool even on error
                return await stream.read()
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, "GET", bucket, key)

    async def head(self, bucket: str, key: str) -> ObjectInfo | None:
        client = await self._get_client()
        try:
            response = await client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            # HEAD has no error body, so a missing bucket also reads as 404: both mean "absent".
            if _error_code(exc) in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                return None
            _raise_translated(exc, "HEAD", bucket, key)
        except BotoCoreError as exc:
            _raise_translated(exc, "HEAD", bucket, key)
        return _info_from_response(bucket, key, response)

    async def list(self, bucket: str, prefix: str = "", *, page_size: int = 1000) -> list[ObjectInfo]:
        client = await self._get_client()
        found: list[ObjectInfo] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
            async for page in pages:
                for item in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            bucket=bucket,
                            key=item["Key"],
                            size=item["Size"],
                            etag=_strip_quotes(item["ETag"]),
                            last_modified=item["LastModified"],
                        )
                    )
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, "LIST", bucket, prefix)
        return found

    async def download_file(self, bucket: str, key: str, dest_path: Path) -> ObjectInfo:
        """Stream the object into ``dest_path`` via a temp file in the same directory + rename."""
        client = await self._get_client()
        dest = Path(dest_path)
        try:
            # GET first: a missing object must not leave directories or temp files behind.
            response = await client.get_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, "GET", bucket, key)
        stream = response["Body"]
        async with stream:  # returns the connection to the pool, also on error
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as writer:
                    try:
                        # iter_chunks checks the byte count against Content-Length at the end.
                        async for chunk in stream.iter_chunks(_CHUNK):
                            writer.write(chunk)
                    except (ClientError, BotoCoreError) as exc:
                        _raise_translated(exc, "GET", bucket, key)
                os.replace(tmp_name, dest)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
        return _info_from_response(bucket, key, response)

    # --- writes -----------------------------------------------------------------------------

    async def create_bucket(self, bucket: str) -> None:
        client = await self._get_client()
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if self.settings.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        try:
            await client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                _raise_translated(exc, "CREATE BUCKET", bucket, "")
        except BotoCoreError as exc:
            _raise_translated(exc, "CREATE BUCKET", bucket, "")

    async def put_bytes(self, bucket: str, key: str, data: bytes) -> ObjectInfo:
        client = await self._get_client()
        try:
            await client.put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, "PUT", bucket, key)
        return await self._head_after_write(bucket, key)

    async def upload_file(self, bucket: str, key: str, src_path: Path) -> ObjectInfo:
        client = await self._get_client()
        try:
            # aioboto3's managed transfer switches to multipart for large files.
            await client.upload_file(str(src_path), bucket, key)
        except (ClientError, BotoCoreError) as exc:
            _raise_translated(exc, "PUT", bucket, key)
        return await self._head_after_write(bucket, key)

    async def _head_after_write(self, bucket: str, key: str) -> ObjectInfo:
        # PUT responses carry no size or Last-Modified; HEAD reports what S3 actually stored.
        info = await self.head(bucket, key)
        if info is None:
            raise ObjectStoreError(f"s3://{bucket}/{key} was written but is not visible to HEAD")
        return info


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def _strip_quotes(etag: str) -> str:
    return etag.strip('"')


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _info_from_response(bucket: str, key: str, response: dict[str, Any]) -> ObjectInfo:
    last_modified = response.get("LastModified")
    if not isinstance(last_modified, datetime):
        raise ObjectStoreError(f"s3://{bucket}/{key}: response has no Last-Modified header")
    return ObjectInfo(
        bucket=bucket,
        key=key,
        size=int(response["ContentLength"]),
        etag=_strip_quotes(response["ETag"]),
        version_id=response.get("VersionId"),
        last_modified=last_modified,
    )


def _raise_translated(exc: Exception, operation: str, bucket: str, key: str) -> NoReturn:
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code == "NoSuchBucket":
            raise BucketNotFoundError(bucket) from exc
        if code in _NOT_FOUND_CODES:
            raise ObjectNotFoundError(bucket, key) from exc
        message = exc.response.get("Error", {}).get("Message", "")
        raise ObjectStoreError(f"S3 {operation} s3://{bucket}/{key} failed: {code} {message}".rstrip()) from exc
    raise ObjectStoreError(f"S3 {operation} s3://{bucket}/{key} failed: {exc}") from exc
