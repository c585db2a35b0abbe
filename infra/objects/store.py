"""The object-store contract the consumer and the ingress program against."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from infra.objects.models import ObjectInfo


@runtime_checkable
class ObjectStore(Protocol):
    """Async access to buckets of objects (S3, MinIO, moto, or a local directory).

    Missing objects raise :class:`~infra.objects.errors.ObjectNotFoundError` (``head`` returns
    None instead); missing buckets raise :class:`~infra.objects.errors.BucketNotFoundError`.
    """

    async def get_bytes(self, bucket: str, key: str) -> bytes: ...

    async def head(self, bucket: str, key: str) -> ObjectInfo | None: ...

    async def list(self, bucket: str, prefix: str = "", *, page_size: int = 1000) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key; pages are followed."""
        ...

    async def download_file(self, bucket: str, key: str, dest_path: Path) -> ObjectInfo:
        """Write the object to ``dest_path`` atomically; return the metadata of what was written."""
        ...

    async def put_bytes(self, bucket: str, key: str, data: bytes) -> ObjectInfo: ...

    async def upload_file(self, bucket: str, key: str, src_path: Path) -> ObjectInfo: ...

    async def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` if it does not exist yet (demos, tests, the embedded mode)."""
        ...

    async def close(self) -> None: ...
