"""Fetching datasets and configs into the worker's cache, against the local store and moto's S3."""

from __future__ import annotations

import asyncio
import io
import stat
import tarfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from consumer.dataset_fetch import DatasetFetchError, FetchedDataset, fetch_config, fetch_dataset
from consumer.limits import DatasetLimits
from infra.objects import LocalObjectStore, ObjectInfo, ObjectStore, S3ObjectStore, locate_object

# A tiny tiled layout: A/ B/ label/ list/, as the dataset readers expect.
TREE: dict[str, bytes] = {
    "A/t_0.png": b"A0" * 10,
    "A/t_1.png": b"A1" * 11,
    "B/t_0.png": b"B0" * 12,
    "B/t_1.png": b"B1" * 13,
    "label/t_0.png": b"L0" * 14,
    "label/t_1.png": b"L1" * 15,
    "list/train.txt": b"t_0.png\n",
    "list/val.txt": b"t_1.png\n",
}


class CountingStore:
    """Delegates to a real store, counting calls and tracking concurrent downloads."""

    def __init__(self, inner: ObjectStore, download_delay_s: float = 0.0) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.download_delay_s = download_delay_s
        self.in_flight = 0
        self.max_in_flight = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await method(*args, **kwargs)

        return counted

    async def download_file(self, bucket: str, key: str, dest_path: Path) -> ObjectInfo:
        self.calls["download_file"] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.download_delay_s)
            return await self.inner.download_file(bucket, key, dest_path)
        finally:
            self.in_flight -= 1

    @property
    def gets(self) -> int:
        return self.calls["download_file"] + self.calls["get_bytes"]


async def put_tree(store: ObjectStore, bucket: str, prefix: str, tree: dict[str, bytes]) -> None:
    await asyncio.gather(*(store.put_bytes(bucket, prefix + rel, data) for rel, data in tree.items()))


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_cache_clean(cache: Path, datasets: int) -> None:
    """Exactly ``datasets`` published entries and no work left in tmp/."""
    assert len(list((cache / "datasets").iterdir())) == datasets
    assert list((cache / "tmp").iterdir()) == []


# --- prefix datasets -------------------------------------------------------------------------


async def test_prefix_fetch_then_cache_hit_then_change(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path
) -> None:
    await put_tree(object_store, store_bucket, "datasets/levir/", TREE)
    await object_store.put_bytes(store_bucket, "datasets/levir2/not-mine.png", b"x")  # sibling prefix
    cache = tmp_path / "cache"
    uri = f"s3://{store_bucket}/datasets/levir/"

    counting = CountingStore(object_store)
    first = await fetch_dataset(counting, uri, cache, max_concurrency=4)
    assert isinstance(first, FetchedDataset)
    assert read_tree(first.path) == TREE
    assert (first.files, first.bytes, first.from_cache) == (len(TREE), sum(map(len, TREE.values())), False)
    assert counting.calls["download_file"] == len(TREE)
    assert_cache_clean(cache, 1)

    # Unchanged: listed again (that is how change is detected) but nothing is downloaded.
    counting = CountingStore(object_store)
    again = await fetch_dataset(counting, uri.rstrip("/"), cache)  # same prefix without the '/'
    assert again.from_cache and again.path == first.path and again.etag_key == first.etag_key
    assert (again.files, again.bytes) == (first.files, first.bytes)
    assert counting.gets == 0 and counting.calls["list"] == 1

    # One object changes: a new cache entry, downloaded afresh.
    await object_store.put_bytes(store_bucket, "datasets/levir/label/t_1.png", b"changed")
    counting = CountingStore(object_store)
    changed = await fetch_dataset(counting, uri, cache)
    assert not changed.from_cache and changed.etag_key != first.etag_key and changed.path != first.path
    assert read_tree(changed.path) == {**TREE, "label/t_1.png": b"changed"}
    assert counting.calls["download_file"] == len(TREE)
    assert read_tree(first.path) == TREE  # the old entry is untouched
    assert_cache_clean(cache, 2)


async def test_prefix_downloads_in_parallel_within_bound(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path
) -> None:
    tree = {f"A/{i:02d}.png": bytes([i]) * 50 for i in range(12)}
    await put_tree(object_store, store_bucket, "ds/", tree)
    counting = CountingStore(object_store, download_delay_s=0.02)
    fetched = await fetch_dataset(counting, f"s3://{store_bucket}/ds/", tmp_path / "cache", max_concurrency=3)
    assert read_tree(fetched.path) == tree
    assert counting.max_in_flight == 3


async def test_missing_prefix_and_bucket(object_store: ObjectStore, store_bucket: str, tmp_path: Path) -> None:
    await object_store.put_bytes(store_bucket, "datasets/other/x", b"x")
    with pytest.raises(DatasetFetchError) as caught:
        await fetch_dataset(object_store, f"s3://{store_bucket}/datasets/levir/", tmp_path / "cache")
    assert str(caught.value) == f"no objects under s3://{store_bucket}/datasets/levir/ — check dataset_uri"

    with pytest.raises(DatasetFetchError, match="bucket 'no-such-bucket-abc' does not exist"):
        await fetch_dataset(object_store, "s3://no-such-bucket-abc/datasets/", tmp_path / "cache")
    with pytest.raises(DatasetFetchError, match="invalid dataset_uri: .*unsupported scheme 'ftp'"):
        await fetch_dataset(object_store, "ftp://host/x", tmp_path / "cache")


class FailingStore(CountingStore):
    """Fails the Nth download, as a dropped connection or a killed worker would."""

    def __init__(self, inner: ObjectStore, fail_on: int) -> None:
        super().__init__(inner)
        self.fail_on = fail_on

    async def download_file(self, bucket: str, key: str, dest_path: Path) -> ObjectInfo:
        if self.calls["download_file"] + 1 == self.fail_on:
            self.calls["download_file"] += 1
            raise ConnectionResetError("connection reset by peer")
        return await super().download_file(bucket, key, dest_path)


async def test_failed_download_leaves_no_dataset_behind(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path
) -> None:
    await put_tree(object_store, store_bucket, "ds/", TREE)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetFetchError, match=r"could not download s3://.*: connection reset by peer"):
        await fetch_dataset(FailingStore(object_store, fail_on=3), f"s3://{store_bucket}/ds/", cache, max_concurrency=2)
    assert_cache_clean(cache, 0)

    fetched = await fetch_dataset(object_store, f"s3://{store_bucket}/ds/", cache)
    assert not fetched.from_cache and read_tree(fetched.path) == TREE


class ChangingStore(CountingStore):
    """Overwrites an object between the LIST and its GET, as a concurrent upload would."""

    async def download_file(self, bucket: str, key: str, dest_path: Path) -> ObjectInfo:
        if key.endswith("A/t_0.png"):
            await self.inner.put_bytes(bucket, key, b"new upload")
        return await super().download_file(bucket, key, dest_path)


async def test_object_changed_during_download(object_store: ObjectStore, store_bucket: str, tmp_path: Path) -> None:
    await put_tree(object_store, store_bucket, "ds/", TREE)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetFetchError, match=r"A/t_0\.png changed while the dataset was downloading"):
        await fetch_dataset(ChangingStore(object_store), f"s3://{store_bucket}/ds/", cache)
    assert_cache_clean(cache, 0)


async def test_s3_folder_markers_skipped_and_unsafe_keys_refused(
    s3_store: S3ObjectStore, s3_bucket: str, tmp_path: Path
) -> None:
    # Consoles create zero-byte "folder" keys ending in '/'; they are not files.
    await put_tree(s3_store, s3_bucket, "ds/", {"A/": b"", "A/x.png": b"x"})
    fetched = await fetch_dataset(s3_store, f"s3://{s3_bucket}/ds/", tmp_path / "cache")
    assert read_tree(fetched.path) == {"A/x.png": b"x"} and fetched.files == 1

    # S3 keys are not paths: one with a '..' segment must not land outside the cache entry.
    await s3_store.put_bytes(s3_bucket, "evil/../../escape.txt", b"x")
    with pytest.raises(DatasetFetchError, match=r"object key 'evil/\.\./\.\./escape\.txt' cannot be stored as a file"):
        await fetch_dataset(s3_store, f"s3://{s3_bucket}/evil/", tmp_path / "cache")
    await put_tree(s3_store, s3_bucket, "clash/", {"a": b"file", "a/b": b"under it"})
    with pytest.raises(DatasetFetchError, match="'clash/a' is both a file and a folder"):
        await fetch_dataset(s3_store, f"s3://{s3_bucket}/clash/", tmp_path / "cache")
    assert not list(tmp_path.rglob("escape.txt"))


async def test_local_path_dataset(tmp_path: Path) -> None:
    root = tmp_path / "data" / "sets" / "levir"
    for rel, data in TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    location = locate_object(f"file://{root}/")
    assert location.root_dir is not None
    store = LocalObjectStore(Path(location.root_dir))
    fetched = await fetch_dataset(store, location, tmp_path / "cache")
    assert read_tree(fetched.path) == TREE

    missing = locate_object(f"{tmp_path}/data/sets/nothing/")
    with pytest.raises(DatasetFetchError, match=f"no objects under file://{tmp_path}/data/sets/nothing/"):
        await fetch_dataset(store, missing, tmp_path / "cache")


# --- archives ---------------------------------------------------------------------------------


def make_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16  # how `zip -y` stores a link
            zf.writestr(info, target)
    return buffer.getvalue()


def make_tar(entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tf.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


async def test_zip_with_single_top_level_dir(object_store: ObjectStore, store_bucket: str, tmp_path: Path) -> None:
    archive = make_zip({f"LEVIR-tiles/{rel}": data for rel, data in TREE.items()} | {"__MACOSX/._x": b"junk"})
    await object_store.put_bytes(store_bucket, "datasets/levir.zip", archive)
    cache = tmp_path / "cache"
    uri = f"s3://{store_bucket}/datasets/levir.zip"

    fetched = await fetch_dataset(object_store, uri, cache)
    assert fetched.path.name == "LEVIR-tiles"  # the single top-level directory is the root
    assert read_tree(fetched.path) == TREE
    assert (fetched.files, fetched.bytes, fetched.from_cache) == (len(TREE), sum(map(len, TREE.values())), False)
    assert_cache_clean(cache, 1)

    counting = CountingStore(object_store)
    again = await fetch_dataset(counting, uri, cache)
    assert again == fetched.model_copy(update={"from_cache": True})
    assert counting.gets == 0

    await object_store.put_bytes(store_bucket, "datasets/levir.zip", make_zip({"LEVIR-tiles/A/t_0.png": b"v2"}))
    changed = await fetch_dataset(object_store, uri, cache)
    assert not changed.from_cache and read_tree(changed.path) == {"A/t_0.png": b"v2"}


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
async def test_tar_gz_without_single_top_dir(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path, suffix: str
) -> None:
    tree = TREE | {"B/same_as_a.png": b""}
    entries: list[tarfile.TarInfo | tuple[str, bytes]] = [(f"./{rel}", data) for rel, data in TREE.items()]
    entries.append(tar_link("B/same_as_a.png", "../A/t_0.png"))  # a link that stays inside is fine
    entries.append(tar_link("label/copy.png", "./label/t_0.png", tarfile.LNKTYPE))
    await object_store.put_bytes(store_bucket, f"levir{suffix}", make_tar(entries))

    fetched = await fetch_dataset(object_store, f"s3://{store_bucket}/levir{suffix}", tmp_path / "cache")
    assert fetched.path == tmp_path / "cache" / "datasets" / fetched.etag_key
    link = fetched.path / "B" / "same_as_a.png"
    assert link.is_symlink() and link.read_bytes() == TREE["A/t_0.png"]
    copy = fetched.path / "label" / "copy.png"
    assert not copy.is_symlink() and copy.read_bytes() == TREE["label/t_0.png"]
    assert set(read_tree(fetched.path)) == set(tree) | {"label/copy.png"}
    assert fetched.files == len(TREE) + 1  # the hardlink became a file; the symlink is not counted


ESCAPES = "escapes the extraction directory"
OUTSIDE_LINK = "is a symlink pointing outside the extraction directory"


@pytest.mark.parametrize(
    ("name", "archive", "message"),
    [
        ("evil.zip", lambda: make_zip({"ok.txt": b"x", "../evil": b"x"}), f"archive member '../evil' {ESCAPES}"),
        ("evil.zip", lambda: make_zip({"a/../../evil": b"x"}), f"archive member 'a/../../evil' {ESCAPES}"),
        ("evil.zip", lambda: make_zip({"/etc/evil": b"x"}), "archive member '/etc/evil' has an absolute path"),
        ("evil.zip", lambda: make_zip({"ok": b"x"}, {"link": "../../outside"}), f"archive member 'link' {OUTSIDE_LINK}"),
        ("evil.tar.gz", lambda: make_tar([("../evil", b"x")]), f"archive member '../evil' {ESCAPES}"),
        ("evil.tar.gz", lambda: make_tar([("/abs/evil", b"x")]), "archive member '/abs/evil' has an absolute path"),
        ("evil.tgz", lambda: make_tar([("A/x", b"x"), tar_link("A/link", "../../outside")]), f"archive member 'A/link' {OUTSIDE_LINK}"),
        ("evil.tgz", lambda: make_tar([("x", b"x"), tar_link("pw", "/etc/passwd")]), "'pw' is a symlink to an absolute path"),
        # Each link alone looks harmless; together "r" resolves to the parent of the root.
        ("evil.tgz", lambda: make_tar([("x", b"x"), tar_link("q", "."), tar_link("r", "q/..")]), f"archive member 'r' {OUTSIDE_LINK}"),
        ("evil.tgz", lambda: make_tar([("x", b"x"), tar_link("h", "../../etc/passwd", tarfile.LNKTYPE)]), "'h' is a hardlink pointing outside"),
        ("evil.tgz", lambda: make_tar([tar_link("dev", "", tarfile.CHRTYPE)]), "'dev' is a device or other special file"),
        ("evil.tgz", lambda: make_tar([tar_link("fifo", "", tarfile.FIFOTYPE)]), "'fifo' is a device or other special file"),
    ],
)
async def test_malicious_archives_are_rejected(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path, name: str, archive: Any, message: str
) -> None:
    await object_store.put_bytes(store_bucket, name, archive())
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(DatasetFetchError) as caught:
        await fetch_dataset(object_store, f"s3://{store_bucket}/{name}", cache)
    assert message in str(caught.value)
    assert_cache_clean(cache, 0)
    assert not [p for p in tmp_path.rglob("*") if p.name in ("evil", "outside")]


async def test_archive_size_and_member_caps(object_store: ObjectStore, store_bucket: str, tmp_path: Path) -> None:
    # 2 MB of zeros compresses to a few KB: a small zip bomb. The zip's central directory
    # declares the size, so it is refused before anything is written; the tar is counted as it streams.
    await object_store.put_bytes(store_bucket, "bomb.zip", make_zip({"d/zeros.bin": bytes(2_000_000)}))
    with pytest.raises(DatasetFetchError) as caught:
        await fetch_dataset(object_store, f"s3://{store_bucket}/bomb.zip", tmp_path / "c",
                            limits=DatasetLimits(max_extracted_bytes=100_000))
    assert str(caught.value) == (
        f"archive s3://{store_bucket}/bomb.zip expands to 2,000,000 bytes (1.9 MiB), over the limit of "
        "100,000 bytes (97.7 KiB) (CDTRAIN_MAX_EXTRACTED_BYTES on the workers); it may be a zip bomb; if the "
        "dataset really is that large, raise the limit")
    tar = make_tar([("d/zeros.bin", bytes(2_000_000))])
    await object_store.put_bytes(store_bucket, "bomb.tar.gz", tar)
    with pytest.raises(DatasetFetchError, match=r"expands to at least 2,000,000 bytes .*, over the limit of "
                                                r"100,000 bytes .*\(CDTRAIN_MAX_EXTRACTED_BYTES on the workers\)"):
        await fetch_dataset(object_store, f"s3://{store_bucket}/bomb.tar.gz", tmp_path / "c",
                            limits=DatasetLimits(max_extracted_bytes=100_000))

    # Many tiny members exhaust inodes rather than bytes.
    await object_store.put_bytes(store_bucket, "many.zip", make_zip({f"f{i}": b"x" for i in range(5)}))
    await object_store.put_bytes(store_bucket, "many.tgz", make_tar([(f"f{i}", b"x") for i in range(5)]))
    for name, counted in (("many.zip", "5 members"), ("many.tgz", "at least 4 members")):
        with pytest.raises(DatasetFetchError) as caught:
            await fetch_dataset(object_store, f"s3://{store_bucket}/{name}", tmp_path / "c",
                                limits=DatasetLimits(max_archive_members=3))
        assert str(caught.value) == (f"archive s3://{store_bucket}/{name} has {counted}, over the limit of 3 "
                                     "(CDTRAIN_MAX_ARCHIVE_MEMBERS on the workers); split it or raise the limit")
    assert_cache_clean(tmp_path / "c", 0)

    # Exactly at a limit is within it.
    exact = DatasetLimits(max_extracted_bytes=2_000_000, max_archive_members=5)
    for name in ("bomb.zip", "bomb.tar.gz", "many.zip", "many.tgz"):
        fetched = await fetch_dataset(object_store, f"s3://{store_bucket}/{name}", tmp_path / "c", limits=exact)
        assert not fetched.from_cache
    assert_cache_clean(tmp_path / "c", 4)


# --- limits checked before the download ------------------------------------------------------


async def test_a_prefix_over_the_object_or_byte_limit_is_refused_from_its_listing(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path
) -> None:
    await put_tree(object_store, store_bucket, "ds/", TREE)
    uri, cache = f"s3://{store_bucket}/ds/", tmp_path / "cache"
    total = sum(map(len, TREE.values()))

    counting = CountingStore(object_store)
    with pytest.raises(DatasetFetchError) as caught:
        await fetch_dataset(counting, uri, cache, limits=DatasetLimits(max_dataset_objects=len(TREE) - 1))
    assert str(caught.value) == (
        f"dataset {uri} holds {len(TREE)} objects, over the limit of {len(TREE) - 1} "
        "(CDTRAIN_MAX_DATASET_OBJECTS on the workers); split the dataset or raise the limit")
    with pytest.raises(DatasetFetchError) as caught:
        await fetch_dataset(counting, uri, cache, limits=DatasetLimits(max_dataset_bytes=total - 1))
    assert str(caught.value) == (
        f"dataset {uri} holds {total} bytes, over the limit of {total - 1} bytes "
        "(CDTRAIN_MAX_DATASET_BYTES on the workers); split the dataset or raise the limit")
    assert counting.gets == 0  # refused from the listing: nothing was downloaded
    assert_cache_clean(cache, 0)

    exact = DatasetLimits(max_dataset_objects=len(TREE), max_dataset_bytes=total)
    fetched = await fetch_dataset(object_store, uri, cache, limits=exact)
    assert read_tree(fetched.path) == TREE
    assert_cache_clean(cache, 1)


async def test_an_archive_over_the_size_limit_is_refused_from_its_head(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path
) -> None:
    archive = make_zip({f"levir/{rel}": data for rel, data in TREE.items()})
    await object_store.put_bytes(store_bucket, "levir.zip", archive)
    uri, cache = f"s3://{store_bucket}/levir.zip", tmp_path / "cache"

    counting = CountingStore(object_store)
    with pytest.raises(DatasetFetchError) as caught:
        await fetch_dataset(counting, uri, cache, limits=DatasetLimits(max_archive_bytes=len(archive) - 1))
    assert str(caught.value) == (
        f"archive {uri} is {len(archive)} bytes, over the limit of {len(archive) - 1} bytes "
        "(CDTRAIN_MAX_ARCHIVE_BYTES on the workers); split the dataset or raise the limit")
    assert counting.gets == 0
    assert_cache_clean(cache, 0)

    fetched = await fetch_dataset(object_store, uri, cache, limits=DatasetLimits(max_archive_bytes=len(archive)))
    assert read_tree(fetched.path) == TREE


class GrowingStore(CountingStore):
    """Replaces the object with a bigger one between its HEAD and its GET (a concurrent upload)."""

    def __init__(self, inner: ObjectStore, replacement: bytes) -> None:
        super().__init__(inner)
        self.replacement = replacement

    async def download_file(self, bucket: str, key: str, dest_path: Path) -> ObjectInfo:
        await self.inner.put_bytes(bucket, key, self.replacement)
        return await super().download_file(bucket, key, dest_path)


async def test_an_archive_that_grew_past_the_limit_after_its_head_is_refused_on_arrival(
    object_store: ObjectStore, store_bucket: str, tmp_path: Path
) -> None:
    small = make_zip({"A/x.png": b"x"})
    big = make_zip({"A/x.png": bytes(range(256)) * 64})
    assert len(big) > len(small)
    await object_store.put_bytes(store_bucket, "grows.zip", small)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetFetchError) as caught:
        await fetch_dataset(GrowingStore(object_store, big), f"s3://{store_bucket}/grows.zip", cache,
                            limits=DatasetLimits(max_archive_bytes=len(small)))
    assert str(caught.value).startswith(f"archive s3://{store_bucket}/grows.zip arrived as {len(big):,} bytes")
    assert f"over the limit of {len(small)} bytes (CDTRAIN_MAX_ARCHIVE_BYTES on the workers)" in str(caught.value)
    assert_cache_clean(cache, 0)


async def test_missing_corrupt_and_empty_archives(object_store: ObjectStore, store_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetFetchError) as caught:
        await fetch_dataset(object_store, f"s3://{store_bucket}/datasets/nope.zip", tmp_path / "c")
    assert str(caught.value) == f"no object at s3://{store_bucket}/datasets/nope.zip — check dataset_uri"

    await object_store.put_bytes(store_bucket, "junk.tar.gz", b"definitely not gzip")
    with pytest.raises(DatasetFetchError, match=r"junk\.tar\.gz is corrupt or not a \.tar\.gz file"):
        await fetch_dataset(object_store, f"s3://{store_bucket}/junk.tar.gz", tmp_path / "c")
    await object_store.put_bytes(store_bucket, "empty.zip", make_zip({"only-a-dir/": b""}))
    with pytest.raises(DatasetFetchError, match="contains no files"):
        await fetch_dataset(object_store, f"s3://{store_bucket}/empty.zip", tmp_path / "c")
    assert_cache_clean(tmp_path / "c", 0)


# --- configs ----------------------------------------------------------------------------------


async def test_fetch_config(object_store: ObjectStore, store_bucket: str) -> None:
    yaml_text = "epochs: 3\nbase_channel: 16\n"
    await object_store.put_bytes(store_bucket, "configs/run.yaml", b"\xef\xbb\xbf" + yaml_text.encode())
    assert await fetch_config(object_store, f"s3://{store_bucket}/configs/run.yaml") == yaml_text

    with pytest.raises(DatasetFetchError) as caught:
        await fetch_config(object_store, f"s3://{store_bucket}/configs/missing.yaml")
    assert str(caught.value) == f"no config at s3://{store_bucket}/configs/missing.yaml — check config_uri"
    with pytest.raises(DatasetFetchError) as caught:
        await fetch_config(object_store, f"s3://{store_bucket}/configs/run.yaml", max_bytes=10)
    assert str(caught.value) == (
        f"config s3://{store_bucket}/configs/run.yaml is {len(yaml_text) + 3} bytes, over the limit of 10 bytes "
        "(CDTRAIN_MAX_CONFIG_BYTES on the workers); is config_uri pointing at the right file?")
    assert await fetch_config(object_store, f"s3://{store_bucket}/configs/run.yaml",
                              max_bytes=len(yaml_text) + 3) == yaml_text  # exactly at the limit
    with pytest.raises(DatasetFetchError, match="names a prefix, not a file"):
        await fetch_config(object_store, f"s3://{store_bucket}/configs/")
    await object_store.put_bytes(store_bucket, "configs/bin.yaml", b"\xff\xfe\x00")
    with pytest.raises(DatasetFetchError, match="is not UTF-8 text"):
        await fetch_config(object_store, f"s3://{store_bucket}/configs/bin.yaml")
