"""The worker's dataset cache: complete datasets by content key, bounded in bytes, least recently
used evicted first.

Layout under ``root``::

    datasets/<key>/     complete datasets only: they appear there by one atomic rename
    sizes/<key>.json    files and bytes of each published dataset, written when it is published,
                        so that neither eviction nor a cache hit walks a tree
    tmp/<key>.<rnd>/    work in progress, and evicted datasets on their way out; removed on
                        failure, swept when stale after a crash

"Recently used" is the mtime of ``datasets/<key>/``, set on publish and on every cache hit. A
dataset is never evicted while it is being fetched or held (:meth:`DatasetCache.hold`: the job
training on it); when the held datasets alone exceed the bound, everything else goes and a
warning says so. Blocking methods: callers run them in a thread.

Several worker processes may share one cache directory: renames keep each dataset whole, but
holds are per process, so with a shared cache another worker may evict a dataset this one
trains on. Give each worker its own ``CDTRAIN_DATA_DIR`` when that matters.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from consumer.limits import format_bytes

log = logging.getLogger(__name__)

_STALE_TMP_SECONDS = 24 * 3600


class DatasetSize(BaseModel):
    model_config = ConfigDict(frozen=True)

    files: int = Field(ge=0)
    bytes: int = Field(ge=0)


class DatasetCache:
    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        """``max_bytes``: the bound on published datasets (None: unbounded, nothing is evicted)."""
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.root = Path(root)
        self.datasets = self.root / "datasets"
        self.sizes = self.root / "sizes"
        self.tmp = self.root / "tmp"
        self.max_bytes = max_bytes
        self._held: dict[str, str] = {}  # holder (a job) -> dataset key
        self._lock = threading.Lock()  # one eviction at a time in this process; guards _held

    # --- directories ---------------------------------------------------------------------------

    def prepare(self) -> None:
        for directory in (self.datasets, self.sizes, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
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

    def final(self, key: str) -> Path:
        return self.datasets / key

    def new_work_dir(self, key: str) -> Path:
        return Path(tempfile.mkdtemp(dir=self.tmp, prefix=f"{key[:16]}."))

    # --- entries -------------------------------------------------------------------------------

    def lookup(self, key: str) -> DatasetSize | None:
        """The size of the published dataset ``key``, marked as just used; None when absent."""
        final = self.final(key)
        if not final.is_dir():
            return None
        self._touch(final)
        return self._size(key)

    def publish(self, work: Path, key: str, size: DatasetSize) -> bool:
        """Rename the complete dataset ``work`` into the cache; False when another fetch
        published the same key first (the same content: use that one)."""
        final = self.final(key)
        try:
            os.rename(work, final)
        except OSError:
            if final.is_dir():
                self._touch(final)
                return False
            raise
        self._write_size(key, size)
        self._touch(final)
        return True

    def hold(self, holder: str, key: str) -> None:
        """Keep ``key`` out of eviction until :meth:`release` (one dataset per holder)."""
        with self._lock:
            self._held[holder] = key

    def release(self, holder: str) -> None:
        with self._lock:
            self._held.pop(holder, None)

    @property
    def held(self) -> dict[str, str]:
        """Holder -> the dataset key it holds."""
        with self._lock:
            return dict(self._held)

    # --- eviction ------------------------------------------------------------------------------

    def make_room(self, incoming: int, keep: str) -> list[str]:
        """Evict least recently used datasets until those published plus ``incoming`` bytes fit
        the bound; never ``keep`` nor a held one. Returns the evicted keys, oldest first."""
        return self._evict(incoming, keep, after_fetch=False)

    def evict(self, keep: str) -> list[str]:
        """After a fetch of ``keep``: evict until the cache fits its bound (see :meth:`make_room`)."""
        return self._evict(0, keep, after_fetch=True)

    def _evict(self, incoming: int, keep: str, *, after_fetch: bool) -> list[str]:
        if self.max_bytes is None:
            return []
        with self._lock:
            entries = self._entries()
            protected = {keep, *self._held.values()}
            used = incoming + sum(size for _, _, size in entries)
            evicted: list[str] = []
            for key, _, size in sorted(entries, key=lambda e: e[1]):
                if used <= self.max_bytes:
                    break
                if key not in protected and self._remove(key, size):
                    evicted.append(key)
                    used -= size
            if used > self.max_bytes:
                # Only protected datasets are left: the one in use trains anyway.
                (log.warning if after_fetch else log.info)(
                    "the dataset cache %s %s %s for the datasets in use (%s), over its bound of %s "
                    "(CDTRAIN_CACHE_MAX_BYTES); every other dataset was evicted%s", self.root,
                    "holds" if after_fetch else "needs", format_bytes(used),
                    ", ".join(sorted(k[:12] for k in protected)), format_bytes(self.max_bytes),
                    "; raise the bound if the disk allows" if after_fetch else "")
            return evicted

    def _entries(self) -> list[tuple[str, float, int]]:
        """(key, last use, bytes) of every published dataset; size files of datasets that are
        gone are removed."""
        entries = []
        for entry in os.scandir(self.datasets):
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                used_at = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            size = self._size(entry.name)
            if size is not None:
                entries.append((entry.name, used_at, size.bytes))
        keys = {key for key, _, _ in entries}
        for path in self.sizes.glob("*.json"):
            if path.stem not in keys and not self.final(path.stem).is_dir():
                path.unlink(missing_ok=True)
        return entries

    def _remove(self, key: str, size: int) -> bool:
        # Renamed out of datasets/ first: no reader ever sees half a dataset.
        doomed = self.tmp / f"{key[:16]}.evicted.{uuid.uuid4().hex[:8]}"
        try:
            last_used = self.final(key).stat().st_mtime
            os.rename(self.final(key), doomed)
        except FileNotFoundError:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        (self.sizes / f"{key}.json").unlink(missing_ok=True)
        log.info("evicted dataset %s from the cache (%s, last used %s)", key, format_bytes(size),
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last_used)))
        return True

    # --- sizes ---------------------------------------------------------------------------------

    def _size(self, key: str) -> DatasetSize | None:
        """From the size file; measured once (and written) for a dataset published without one
        (a crash between the rename and the size file, or an older cache)."""
        path = self.sizes / f"{key}.json"
        try:
            return DatasetSize.model_validate_json(path.read_bytes())
        except (FileNotFoundError, ValidationError):
            pass
        try:
            size = _measure(self.final(key))
        except FileNotFoundError:
            return None
        self._write_size(key, size)
        return size

    def _write_size(self, key: str, size: DatasetSize) -> None:
        self.sizes.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.sizes, prefix=f".{key[:16]}.", suffix=".part")
        try:
            with os.fdopen(fd, "w") as writer:
                writer.write(size.model_dump_json())
            os.replace(tmp_name, self.sizes / f"{key}.json")
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path)
        except OSError:
            pass


def _measure(root: Path) -> DatasetSize:
    if not root.is_dir():
        raise FileNotFoundError(root)
    files = size = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return DatasetSize(files=files, bytes=size)
