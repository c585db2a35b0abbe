"""A job's checkpoints in the object store, so that any worker can resume it.

Layout under ``CDTRAIN_CHECKPOINT_URI`` (``s3://bucket/prefix/``, or a local directory in the
embedded mode)::

    <prefix><job_id>/attempt-<n>/last.pt        the newest training state of attempt n
    <prefix><job_id>/attempt-<n>/best.pt        the best epoch's state, when attempt n made one
    <prefix><job_id>/attempt-<n>/progress.json  what last.pt holds (:class:`StoredProgress`)

One folder per attempt: a superseded attempt that still writes (it stops at its next heartbeat)
never mixes its files with the next attempt's. ``progress.json`` is written after ``last.pt``, and
``best.pt`` before it, so a manifest never names files that are not there; it also names the
``best.pt`` that goes with its ``last.pt``, which may be an earlier attempt's (a resumed attempt
that has not beaten the best yet). The next attempt resumes from the manifest with the most
training (global step), whatever attempt wrote it.

Uploads run in the training thread at every checkpoint (:class:`CheckpointUploader`), before the
trainer announces the epoch: a checkpoint is in the store before its epoch's metrics are logged,
so a resumed attempt never logs an epoch twice. A failed upload is logged and training goes on:
the job is still alive, and the next checkpoint tries again.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from infra.objects import LocalObjectStore, ObjectNotFoundError, ObjectStore, ObjectStoreError, locate_object
from schemas.jobs import UtcDatetime, utc_now
from snunet_cbam.hooks import CheckpointInfo, TrainerHooks

log = logging.getLogger(__name__)

MANIFEST = "progress.json"
_ATTEMPT_DIR = re.compile(r"attempt-(\d+)/" + re.escape(MANIFEST) + "$")


class StoredProgress(BaseModel):
    """The manifest of one attempt's newest checkpoint."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    job_id: str
    attempt: int = Field(ge=0)
    epoch: int = Field(ge=0)  # last completed epoch
    global_step: int = Field(ge=0)
    step_in_epoch: int = Field(0, ge=0)
    finished: bool = False  # training is over; a resumed attempt only ends the run
    last_key: str
    best_key: str | None = None  # None until some attempt of the job made a best epoch
    written_at: UtcDatetime


class CheckpointStore:
    """The checkpoints of every job under one ``bucket``/``prefix`` of an object store."""

    def __init__(self, objects: ObjectStore, bucket: str, prefix: str = "") -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.objects = objects
        self.bucket = bucket
        self.prefix = prefix

    @classmethod
    def at(cls, uri: str, s3: ObjectStore) -> "CheckpointStore":
        """``s3://bucket/prefix/`` on ``s3`` (the configured store), or a local directory."""
        location = locate_object(uri if uri.endswith("/") else uri + "/")
        if location.store == "s3":
            return cls(s3, location.bucket, location.key)
        return cls(LocalObjectStore(str(location.root_dir)), location.bucket, location.key)

    def __str__(self) -> str:
        return f"{self.bucket}/{self.prefix}"

    async def check(self) -> None:
        """Fail at start-up, with the location named, when the store cannot be used (a local
        directory is created)."""
        if isinstance(self.objects, LocalObjectStore):
            await self.objects.create_bucket(self.bucket)
        try:
            await self.objects.list(self.bucket, self.prefix, page_size=1)
        except ObjectStoreError as exc:
            raise RuntimeError(f"checkpoint store {self} is not usable (CDTRAIN_CHECKPOINT_URI): {exc}") from exc

    def _folder(self, job_id: str, attempt: int) -> str:
        return f"{self.prefix}{job_id}/attempt-{attempt}/"

    # --- writing ----------------------------------------------------------------------------------
    async def save(self, job_id: str, attempt: int, info: CheckpointInfo, best_key: str | None) -> str:
        """Upload one checkpoint file; after a ``last`` one, its manifest. Returns the file's key."""
        key = self._folder(job_id, attempt) + info.path.name
        await self.objects.upload_file(self.bucket, key, info.path)
        if info.kind == "last":
            progress = StoredProgress(
                job_id=job_id, attempt=attempt, epoch=info.epoch, global_step=info.global_step,
                step_in_epoch=info.step_in_epoch, finished=info.finished, last_key=key, best_key=best_key,
                written_at=utc_now(),
            )
            await self.objects.put_bytes(self.bucket, self._folder(job_id, attempt) + MANIFEST,
                                         progress.model_dump_json().encode())
        return key

    # --- reading ----------------------------------------------------------------------------------
    async def latest(self, job_id: str) -> StoredProgress | None:
        """The manifest with the most training among the job's attempts; None for a new job."""
        found: list[StoredProgress] = []
        for info in await self.objects.list(self.bucket, f"{self.prefix}{job_id}/"):
            if _ATTEMPT_DIR.search(info.key):
                raw = await self.objects.get_bytes(self.bucket, info.key)
                found.append(StoredProgress.model_validate_json(raw))
        # Ties (same step): a completed epoch beats its own unvalidated end, then finished, then newer.
        return max(found, key=lambda p: (p.global_step, p.epoch, p.finished, p.attempt), default=None)

    async def restore(self, progress: StoredProgress, dest_dir: Path, last_name: str, best_name: str) -> None:
        """Download the manifest's ``last`` (and its ``best``) checkpoint into ``dest_dir``."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        await self.objects.download_file(self.bucket, progress.last_key, dest_dir / last_name)
        if progress.best_key is not None:
            try:
                await self.objects.download_file(self.bucket, progress.best_key, dest_dir / best_name)
            except ObjectNotFoundError:
                # Removed by hand or a lifecycle rule: training resumes, the best is found again.
                log.warning("checkpoint %s is gone; the resumed run keeps only its own best epoch",
                            progress.best_key)


class CheckpointUploader(TrainerHooks):
    """Uploads every checkpoint the trainer writes, from the training thread, waiting for it."""

    def __init__(self, store: CheckpointStore, job_id: str, attempt: int, loop: asyncio.AbstractEventLoop, *,
                 best_key: str | None = None, timeout_s: float = 600.0,
                 enabled: Callable[[], bool] = lambda: True) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.loop = loop
        self.best_key = best_key  # the best checkpoint the next manifest names
        self.timeout_s = timeout_s
        # False once the attempt was superseded: its files would only mislead the next resume.
        self.enabled = enabled
        self.failures = 0
        self._unsent_best: CheckpointInfo | None = None

    def on_checkpoint_saved(self, info: CheckpointInfo) -> None:
        if not self.enabled():
            return
        if self._unsent_best is not None and info.kind == "last":
            # The best file is still on disk (the trainer rewrites it only with a newer best):
            # send it first, or the manifest would pair this last.pt with an older best.
            if not self._upload(self._unsent_best):
                return
        self._upload(info)

    def _upload(self, info: CheckpointInfo) -> bool:
        future = asyncio.run_coroutine_threadsafe(
            self.store.save(self.job_id, self.attempt, info, self.best_key), self.loop)
        try:
            key = future.result(self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a store outage must not end a healthy run
            future.cancel()
            self.failures += 1
            log.warning("job %s: %s checkpoint of epoch %d not uploaded to %s (%s); training goes on",
                        self.job_id, info.kind, info.epoch, self.store, exc)
            if info.kind == "best":
                self._unsent_best = info
            return False
        if info.kind == "best":
            self.best_key, self._unsent_best = key, None
        return True
