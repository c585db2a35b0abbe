"""Which object store serves a dataset or config URI."""

from __future__ import annotations

from infra.objects import LocalObjectStore, ObjectLocation, ObjectStore, locate_object
from infra.objects.allow_list import UriAllowList


class StoreResolver:
    """``s3://`` goes to the configured store (S3, or the local-directory store of the embedded
    mode); ``file://`` and absolute paths only where local data is allowed (never on a shared
    worker, where they would read the worker's own disk). ``allowed`` is checked here too, not
    only at the ingress: a request can reach the queue by other ways than the ingress."""

    def __init__(self, s3: ObjectStore, allow_local_paths: bool = False, allowed: UriAllowList | None = None) -> None:
        self.s3 = s3
        self.allow_local_paths = allow_local_paths
        self.allowed = allowed  # None: any location
        self._local: dict[str, LocalObjectStore] = {}

    def resolve(self, uri: str, field: str) -> tuple[ObjectStore, ObjectLocation]:
        if self.allowed is not None and (why := self.allowed.refusal(uri)) is not None:
            raise ValueError(f"{field} '{uri}': {why}")
        location = locate_object(uri)
        if location.store == "s3":
            return self.s3, location
        if not self.allow_local_paths:
            raise ValueError(f"{field} '{uri}': local paths are not allowed on this worker; use s3://bucket/key")
        root = str(location.root_dir)
        store = self._local.setdefault(root, LocalObjectStore(root))
        return store, location
