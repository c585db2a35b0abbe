"""Object URIs: ``s3://bucket/key`` for buckets, ``file:///abs/path`` or ``/abs/path`` for local data.

``parse_object_uri`` handles the bucket form; ``locate_object`` accepts every form and says which
store serves it, so a worker can pick the S3 store or a :class:`LocalObjectStore` rooted at
``location.root_dir``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal, NamedTuple
from urllib.parse import unquote, urlsplit

# Loose on purpose, and the same rule as schemas.jobs.split_s3_uri: legacy us-east-1 buckets may
# hold capitals and '_', and the server rejects names it does not know anyway.
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


class ObjectURI(NamedTuple):
    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


def parse_object_uri(uri: str) -> ObjectURI:
    """Split ``s3://bucket/some/prefix/`` into ``("s3", "bucket", "some/prefix/")``.

    The key is taken verbatim (no percent-decoding), as the AWS CLI does; it may be empty (the
    whole bucket). Raises ValueError naming the problem.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("object URI is empty; expected s3://bucket/key")
    if uri != uri.strip():
        raise ValueError(f"object URI {uri!r} has leading or trailing whitespace")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise ValueError(f"object URI {uri!r} has no scheme; expected s3://bucket/key")
    if scheme.lower() != "s3":
        raise ValueError(f"object URI {uri!r} has unsupported scheme '{scheme}'; expected s3://bucket/key")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"object URI {uri!r} has no bucket name; expected s3://bucket/key")
    _check_bucket_name(bucket, uri)
    if key.startswith("/"):
        raise ValueError(f"object URI {uri!r} has a key starting with '/' (double slash after the bucket)")
    return ObjectURI("s3", bucket, key)


def _check_bucket_name(bucket: str, uri: str) -> None:
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(
            f"bucket name '{bucket}' in {uri!r} is not valid: use 2-255 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )


@dataclass(frozen=True)
class ObjectLocation:
    """Where an object or prefix lives and which store serves it.

    For ``store == "local"``, ``root_dir`` is the directory that holds ``bucket`` as a
    sub-directory, i.e. the root to give :class:`~infra.objects.local.LocalObjectStore`.
    """

    store: Literal["s3", "local"]
    bucket: str
    key: str
    root_dir: PurePosixPath | None = None

    def __str__(self) -> str:
        if self.store == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return f"file://{PurePosixPath(self.root_dir or '/', self.bucket)}/{self.key}"


def locate_object(uri: str) -> ObjectLocation:
    """Resolve ``s3://...``, ``file:///abs/path`` or ``/abs/path`` to an :class:`ObjectLocation`.

    A local path ``/data/sets/levir/`` becomes bucket ``sets`` under root ``/data`` with key
    ``levir/``: the parent directory plays the bucket, so the same fetch code serves both stores.
    Relative paths are refused: a service has no meaningful working directory.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("object URI is empty; expected s3://bucket/key, file:///abs/path or /abs/path")
    if uri.lower().startswith("s3://"):
        parsed = parse_object_uri(uri)
        return ObjectLocation("s3", parsed.bucket, parsed.key)
    if uri.lower().startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {uri!r} names host '{parts.netloc}'; use file:///abs/path")
        if parts.query or parts.fragment:
            raise ValueError(f"file URI {uri!r} has a query or fragment; use file:///abs/path")
        path = unquote(parts.path)
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"object URI {uri!r} has unsupported scheme '{scheme}'; use s3:// or file://")
    else:
        path = uri
    if not path.startswith("/"):
        raise ValueError(f"local path {path!r} is relative; give an absolute path or file:///abs/path")
    trailing = path.endswith("/")
    pure = PurePosixPath(path)
    if ".." in pure.parts:
        raise ValueError(f"local path {path!r} contains '..'; give a normalised absolute path")
    if len(pure.parts) < 3:
        raise ValueError(
            f"local path {path!r} is too close to '/': it needs a parent directory that is not '/'"
        )
    key = pure.name + ("/" if trailing else "")
    return ObjectLocation("local", pure.parent.name, key, root_dir=pure.parent.parent)
