"""Bucket events for the embedded mode: the local object directory, polled.

With no MinIO or S3 there is nobody to send notifications, so dropping a dataset into
``<objects>/<bucket>/datasets/`` is noticed here and fed to the same handler the webhook, AMQP
and SQS paths use (same trigger rule, same de-duplication).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from ingress.bucket_events import BucketEventHandler
from schemas.bucket_events import ObjectCreated

log = logging.getLogger(__name__)


class LocalBucketWatcher:
    def __init__(self, root: Path, prefix: str, handler: BucketEventHandler, interval: float = 1.0) -> None:
        self.root = Path(root)
        self.prefix = prefix
        self.handler = handler
        self.interval = interval
        # (bucket, key) -> (size, mtime) at the last scan, and the versions already announced.
        self._last: dict[tuple[str, str], tuple[int, int]] = {}
        self._announced: set[tuple[str, str, tuple[int, int]]] = set()

    def _scan(self) -> list[tuple[ObjectCreated, tuple[str, str, tuple[int, int]]]]:
        """Files unchanged since the previous scan (a copy still being written is left alone)."""
        ready = []
        current: dict[tuple[str, str], tuple[int, int]] = {}
        if not self.root.is_dir():
            return ready
        for bucket_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            base = bucket_dir / self.prefix
            if not base.exists():
                continue
            for path in sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")):
                key = path.relative_to(bucket_dir).as_posix()
                stat = path.stat()
                state = (stat.st_size, stat.st_mtime_ns)
                current[(bucket_dir.name, key)] = state
                version = (bucket_dir.name, key, state)
                if self._last.get((bucket_dir.name, key)) != state or version in self._announced:
                    continue
                etag = hashlib.md5(f"{key}:{state}".encode()).hexdigest()  # names this version
                ready.append((ObjectCreated(bucket=bucket_dir.name, key=key, size=stat.st_size, etag=etag,
                                            source="local"), version))
        self._last = current
        return ready

    async def run(self) -> None:
        while True:
            try:
                for obj, version in await asyncio.to_thread(self._scan):
                    result = await self.handler.handle_object(obj)
                    self._announced.add(version)
                    log.info("bucket object %s: %s %s", obj.uri, result.action, result.job_id or result.reason)
            except Exception:  # noqa: BLE001 - keep watching; the next scan retries
                log.exception("local bucket scan failed")
            await asyncio.sleep(self.interval)
