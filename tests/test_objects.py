"""The object-store contract, run against the local store and moto's S3 server alike."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path, PurePosixPath

import pytest

from infra.objects import (
    BucketNotFoundError,
    LocalObjectStore,
    ObjectLocation,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    S3ObjectStore,
    S3Settings,
    locate_object,
    parse_object_uri,
)


# --- both stores -----------------------------------------------------------------------------


async def test_store_satisfies_protocol(object_store: ObjectStore) -> None:
    assert isinstance(object_store, ObjectStore)


async def test_put_get_head(object_store: ObjectStore, store_bucket: str) -> None:
    data = b"hello change detection"
    put = await object_store.put_bytes(store_bucket, "a/b/c.txt", data)

    assert await object_store.get_bytes(store_bucket, "a/b/c.txt") == data
    info = await object_store.head(store_bucket, "a/b/c.txt")
    assert info is not None
    assert (info.bucket, info.key, info.size) == (store_bucket, "a/b/c.txt", len(data))
    # Single-part ETag = MD5 of the content on both stores, without S3's quotes.
    assert info.etag == hashlib.md5(data).hexdigest() == put.etag
    assert isinstance(info.last_modified, datetime) and info.last_modified.tzinfo is not None


async def test_overwrite_changes_etag(object_store: ObjectStore, store_bucket: str) -> None:
    first = await object_store.put_bytes(store_bucket, "k", b"one")
    second = await object_store.put_bytes(store_bucket, "k", b"two")
    assert first.etag != second.etag
    assert await object_store.get_bytes(store_bucket, "k") == b"two"


async def test_missing_object_and_bucket(object_store: ObjectStore, store_bucket: str, tmp_path: Path) -> None:
    assert await object_store.head(store_bucket, "nope") is None
    with pytest.raises(ObjectNotFoundError, match=f"s3://{store_bucket}/nope"):
        await object_store.get_bytes(store_bucket, "nope")
    with pytest.raises(ObjectNotFoundError):
        await object_store.download_file(store_bucket, "nope", tmp_path / "dl" / "never-written")
    assert not (tmp_path / "dl").exists()  # nothing created for an object that is not there
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-xyz"):
        await object_store.list("no-such-bucket-xyz", "")
    with pytest.raises(BucketNotFoundError):
        await object_store.get_bytes("no-such-bucket-xyz", "k")


async def test_list_prefix_sorted_and_paginated(object_store: ObjectStore, store_bucket: str) -> None:
    keys = ["ds/A/1.png", "ds/A/2.png", "ds/B/1.png", "ds/label/1.png", "ds/list/train.txt", "ds2/x", "other"]
    for key in reversed(keys):
        await object_store.put_bytes(store_bucket, key, key.encode())

    # page_size 2 forces several LIST pages on S3; every key must still come back, in order.
    listed = await object_store.list(store_bucket, "ds/", page_size=2)
    assert [o.key for o in listed] == keys[:5]
    assert all(o.size == len(o.key) and o.etag == hashlib.md5(o.key.encode()).hexdigest() for o in listed)
    # A prefix is a string prefix, not a directory: "ds" also matches "ds2/x".
    assert [o.key for o in await object_store.list(store_bucket, "ds", page_size=3)] == keys[:6]
    assert [o.key for o in await object_store.list(store_bucket, "ds/A/2")] == ["ds/A/2.png"]
    assert [o.key for o in await object_store.list(store_bucket)] == sorted(keys)
    assert await object_store.list(store_bucket, "missing/") == []


async def test_download_and_upload_file(object_store: ObjectStore, store_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB: more than one read chunk
    uploaded = await object_store.upload_file(store_bucket, "blobs/src.bin", src)
    assert uploaded.size == src.stat().st_size

    dest = tmp_path / "out" / "deep" / "dest.bin"
    got = await object_store.download_file(store_bucket, "blobs/src.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert got.etag == uploaded.etag and got.size == uploaded.size
    assert not [p for p in dest.parent.iterdir() if p != dest], "temp files left beside the download"


async def test_create_bucket_is_idempotent(object_store: ObjectStore, store_bucket: str) -> None:
    await object_store.create_bucket(store_bucket)
    await object_store.put_bytes(store_bucket, "k", b"v")
    await object_store.create_bucket(store_bucket)
    assert await object_store.get_bytes(store_bucket, "k") == b"v"


# --- backend specifics -----------------------------------------------------------------------


async def test_local_store_refuses_keys_that_escape(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "root")
    await store.create_bucket("b")
    for key in ["../outside", "a/../../x", "a//b", "dir/"]:
        with pytest.raises(ObjectStoreError, match="not usable in the local store"):
            await store.put_bytes("b", key, b"x")
    assert not (tmp_path / "outside").exists()


async def test_local_list_hides_in_progress_writes(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    await store.create_bucket("b")
    await store.put_bytes("b", "d/done", b"x")
    (tmp_path / "b" / "d" / ".x.123.cdtrain-part").write_bytes(b"partial")
    assert [o.key for o in await store.list("b", "d/")] == ["d/done"]


async def test_s3_store_reuses_one_client_and_closes(s3_settings: S3Settings, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_settings)
    async with store:
        await store.put_bytes(s3_bucket, "k", b"v")
        client = store._client
        assert await store.get_bytes(s3_bucket, "k") == b"v"
        assert store._client is client
    assert store._client is None


async def test_s3_unreachable_endpoint_is_a_clear_error() -> None:
    settings = S3Settings(
        endpoint_url="http://127.0.0.1:9", access_key_id="x", secret_access_key="y",
        max_attempts=1, connect_timeout_s=1,
    )
    async with S3ObjectStore(settings) as store:
        with pytest.raises(ObjectStoreError, match=r"S3 GET s3://b/k failed: Could not connect"):
            await store.get_bytes("b", "k")


def test_s3_settings_from_env_and_secrets_hidden() -> None:
    settings = S3Settings.from_env(
        {"CDTRAIN_S3_ENDPOINT_URL": "http://minio:9000", "AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk",
         "HOME": "/x"}
    )
    assert settings.endpoint_url == "http://minio:9000" and settings.region == "us-east-1"
    assert "sk" not in repr(settings)
    assert settings.secret_access_key is not None and settings.secret_access_key.get_secret_value() == "sk"


# --- URIs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/some/prefix/", ("s3", "bucket", "some/prefix/")),
        ("s3://my.bucket-1/a%20b.zip", ("s3", "my.bucket-1", "a%20b.zip")),
        ("s3://bucket", ("s3", "bucket", "")),
        ("s3://bucket/", ("s3", "bucket", "")),
        ("S3://bucket/k", ("s3", "bucket", "k")),
        ("s3://Legacy_Bucket/k", ("s3", "Legacy_Bucket", "k")),  # old us-east-1 names
    ],
)
def test_parse_object_uri(uri: str, expected: tuple[str, str, str]) -> None:
    parsed = parse_object_uri(uri)
    assert tuple(parsed) == expected
    scheme, bucket, key = parsed  # unpacks like the tuple it is
    assert str(parsed) == f"s3://{bucket}/{key}"


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("", "empty"),
        ("bucket/key", "no scheme"),
        ("http://bucket/key", "unsupported scheme 'http'"),
        ("s3:///key", "no bucket name"),
        ("s3://-bucket/key", "bucket name '-bucket'"),
        ("s3://a/key", "bucket name 'a'"),
        ("s3://my bucket/key", "bucket name 'my bucket'"),
        ("s3://bucket//key", "double slash"),
        (" s3://bucket/key", "whitespace"),
    ],
)
def test_parse_object_uri_errors(uri: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_object_uri(uri)


def test_locate_object() -> None:
    assert locate_object("s3://b1b/datasets/levir/") == ObjectLocation("s3", "b1b", "datasets/levir/")

    local = locate_object("file:///srv/data/levir/")
    assert local == ObjectLocation("local", "data", "levir/", root_dir=PurePosixPath("/srv"))
    assert str(local) == "file:///srv/data/levir/"
    assert locate_object("/srv/data/levir.zip") == ObjectLocation(
        "local", "data", "levir.zip", root_dir=PurePosixPath("/srv")
    )
    top = locate_object("file://localhost/data/my%20set/")
    assert (top.store, top.bucket, top.key, top.root_dir) == ("local", "data", "my set/", PurePosixPath("/"))
    assert str(top) == "file:///data/my set/"


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("data/levir", "relative"),
        ("file://host/data/levir", "names host 'host'"),
        ("/levir.zip", "too close to '/'"),
        ("/data/../etc/x", r"contains '\.\.'"),
        ("gs://bucket/key", "unsupported scheme 'gs'"),
        ("s3://x/key", "bucket name 'x'"),
    ],
)
def test_locate_object_errors(uri: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        locate_object(uri)


async def test_local_location_reads_through_local_store(tmp_path: Path) -> None:
    (tmp_path / "sets" / "levir").mkdir(parents=True)
    (tmp_path / "sets" / "levir" / "x.txt").write_text("x")
    location = locate_object(f"{tmp_path}/sets/levir/")
    assert location.root_dir is not None
    store = LocalObjectStore(Path(location.root_dir))
    assert [o.key for o in await store.list(location.bucket, location.key)] == ["levir/x.txt"]
