"""Errors raised by every :class:`~infra.objects.store.ObjectStore`, whatever the backend.

Callers branch on these types, never on botocore's error codes, so a test written against the
local store means the same thing against S3.
"""

from __future__ import annotations


class ObjectStoreError(Exception):
    """An object-store call failed; the message says which object and why."""


class ObjectNotFoundError(ObjectStoreError):
    def __init__(self, bucket: str, key: str) -> None:
        super().__init__(f"no object at s3://{bucket}/{key}")
        self.bucket = bucket
        self.key = key


class BucketNotFoundError(ObjectStoreError):
    def __init__(self, bucket: str) -> None:
        super().__init__(f"bucket '{bucket}' does not exist")
        self.bucket = bucket
