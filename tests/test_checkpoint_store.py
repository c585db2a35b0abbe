"""The checkpoint store (consumer/checkpoints.py) on a local directory and on S3 (moto over HTTP)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from consumer.checkpoints import CheckpointStore, CheckpointUploader
from infra.objects import LocalObjectStore, ObjectStore
from snunet_cbam.hooks import CheckpointInfo


def checkpoint(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


async def test_the_newest_training_state_of_any_attempt_is_restored_with_its_best(
        object_store: ObjectStore, store_bucket: str, tmp_path: Path) -> None:
    store = CheckpointStore(object_store, store_bucket, "runs")
    assert store.prefix == "runs/" and await store.latest("job") is None
    work = tmp_path / "work"
    best = await store.save("job", 0, CheckpointInfo("best", checkpoint(work / "best.pt", "best of epoch 2"), 2,
                                                     global_step=20), best_key=None)
    await store.save("job", 0, CheckpointInfo("last", checkpoint(work / "last.pt", "epoch 2"), 2, global_step=20),
                     best_key=best)
    # Attempt 1 resumed from it, trained on without a new best, and was killed inside epoch 4.
    await store.save("job", 1, CheckpointInfo("last", checkpoint(work / "last.pt", "epoch 3 + 5 steps"), 3,
                                              global_step=35, step_in_epoch=5), best_key=best)
    # Attempt 2 was superseded early: less training, so not the one to resume.
    await store.save("job", 2, CheckpointInfo("last", checkpoint(work / "last.pt", "epoch 1"), 1, global_step=10),
                     best_key=None)
    await store.save("other", 0, CheckpointInfo("last", checkpoint(work / "last.pt", "x"), 9, global_step=99),
                     best_key=None)

    latest = await store.latest("job")
    assert (latest.attempt, latest.epoch, latest.global_step, latest.step_in_epoch) == (1, 3, 35, 5)
    assert latest.best_key == "runs/job/attempt-0/best.pt" and not latest.finished
    restored = tmp_path / "restored"
    await store.restore(latest, restored, "last.pt", "best.pt")
    assert (restored / "last.pt").read_text() == "epoch 3 + 5 steps"
    assert (restored / "best.pt").read_text() == "best of epoch 2"


async def test_a_finished_checkpoint_wins_a_tie(object_store: ObjectStore, store_bucket: str, tmp_path: Path) -> None:
    store = CheckpointStore(object_store, store_bucket, "")
    path = checkpoint(tmp_path / "last.pt", "x")
    await store.save("j", 3, CheckpointInfo("last", path, 5, global_step=50, finished=True), best_key=None)
    await store.save("j", 4, CheckpointInfo("last", path, 5, global_step=50), best_key=None)
    assert (await store.latest("j")).attempt == 3


class FlakyStore(LocalObjectStore):
    """Fails the next ``failures`` uploads (a store outage)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failures = 0

    async def upload_file(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise OSError("store unreachable")
        return await super().upload_file(*args, **kwargs)


async def test_an_upload_that_failed_is_logged_training_goes_on_and_the_best_is_sent_before_the_next_last(
        tmp_path: Path) -> None:
    objects = FlakyStore(tmp_path / "objects")
    store = CheckpointStore(objects, "ckpt", "p/")
    await store.check()  # a local directory is created
    uploader = CheckpointUploader(store, "job", 0, asyncio.get_running_loop(), timeout_s=10)
    work = tmp_path / "work"

    def train() -> None:  # the training thread
        objects.failures = 1  # the best of epoch 1 is lost on the way...
        uploader.on_checkpoint_saved(CheckpointInfo("best", checkpoint(work / "best.pt", "best 1"), 1, global_step=4))
        uploader.on_checkpoint_saved(CheckpointInfo("last", checkpoint(work / "last.pt", "last 1"), 1, global_step=4))

    await asyncio.to_thread(train)
    latest = await store.latest("job")
    # ...and sent again before the last that goes with it: the manifest never pairs it with an older best.
    assert uploader.failures == 1 and latest.best_key == "p/job/attempt-0/best.pt"
    assert (await objects.get_bytes("ckpt", latest.best_key)) == b"best 1"

    def train_on() -> None:
        objects.failures = 2  # the best and its retry fail: no manifest is written for this last
        uploader.on_checkpoint_saved(CheckpointInfo("best", checkpoint(work / "best.pt", "best 2"), 2, global_step=8))
        uploader.on_checkpoint_saved(CheckpointInfo("last", checkpoint(work / "last.pt", "last 2"), 2, global_step=8))

    await asyncio.to_thread(train_on)
    assert (await store.latest("job")).global_step == 4  # the older, consistent pair


async def test_a_superseded_attempt_uploads_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(LocalObjectStore(tmp_path / "objects"), "ckpt")
    await store.check()
    superseded = threading.Event()
    uploader = CheckpointUploader(store, "job", 0, asyncio.get_running_loop(), enabled=lambda: not superseded.is_set())
    superseded.set()
    info = CheckpointInfo("last", checkpoint(tmp_path / "last.pt", "x"), 1, global_step=4)
    await asyncio.to_thread(uploader.on_checkpoint_saved, info)
    assert await store.latest("job") is None


async def test_the_location_comes_from_a_uri_and_a_bad_one_fails_at_start(
        tmp_path: Path, s3_store: ObjectStore) -> None:
    on_s3 = CheckpointStore.at("s3://ckpt-bucket/cdtrain/jobs", s3_store)
    assert (on_s3.objects, on_s3.bucket, on_s3.prefix) == (s3_store, "ckpt-bucket", "cdtrain/jobs/")
    with pytest.raises(RuntimeError, match="checkpoint store ckpt-bucket/cdtrain/jobs/ is not usable"):
        await on_s3.check()  # no such bucket
    local = CheckpointStore.at(str(tmp_path / "data" / "checkpoints"), s3_store)
    # A local directory plays bucket (its parent) and prefix (its name), as a local dataset path does.
    assert isinstance(local.objects, LocalObjectStore) and (local.bucket, local.prefix) == ("data", "checkpoints/")
    await local.check()
    assert (tmp_path / "data").is_dir()
