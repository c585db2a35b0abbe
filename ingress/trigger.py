"""The bucket trigger rule: which created objects start a training job, and with what.

Under ``prefix`` (default ``datasets/``):

- an archive (``.zip``, ``.tar.gz``, ``.tgz``) is a whole dataset: ``dataset_uri`` is the object;
- a ``_READY`` marker says the objects beside it form a dataset: ``dataset_uri`` is the marker's
  directory (``s3://bucket/dir/``), so uploads of many files start one job, once, at the end;
- a ``train_config.yaml`` in the same directory becomes ``config_uri`` (else the default).

Anything else is ignored, with the reason. :func:`classify` is pure; :func:`decide` adds the
one object-store lookup (the config).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from schemas.bucket_events import ObjectCreated
from schemas.jobs import TrainRequest

if TYPE_CHECKING:
    from infra.objects.store import ObjectStore
    from ingress.settings import TriggerSettings

_MAX_IDEMPOTENCY_KEY = 256  # TrainRequest.idempotency_key's limit


@dataclass(frozen=True)
class Match:
    kind: Literal["archive", "marker"]
    dataset_uri: str
    directory: str  # key prefix of the object's directory ("" or ending in "/")


@dataclass(frozen=True)
class Ignored:
    reason: str
    # Worth an operator's attention (logged as a warning), unlike a tile of an upload in progress.
    notable: bool = False


@dataclass(frozen=True)
class Decision:
    """``request`` set: start it; else ``reason`` says why nothing happens."""

    reason: str
    request: TrainRequest | None = None
    notable: bool = False


def classify(obj: ObjectCreated, rule: TriggerSettings) -> Match | Ignored:
    if rule.buckets and obj.bucket not in rule.buckets:
        return Ignored(f"bucket {obj.bucket!r} is not one of the trigger buckets", notable=True)
    if not obj.key.startswith(rule.prefix):
        return Ignored(f"key is outside the trigger prefix {rule.prefix!r}")
    directory, _, name = obj.key.rpartition("/")
    directory = directory + "/" if directory else ""
    if not name:
        return Ignored("a folder placeholder, not an object")
    if name == rule.marker_name:
        return Match("marker", f"s3://{obj.bucket}/{directory}", directory)
    if name.lower().endswith(tuple(s.lower() for s in rule.archive_suffixes)):
        return Match("archive", obj.uri, directory)
    return Ignored(f"neither a dataset archive ({', '.join(rule.archive_suffixes)}) nor a "
                   f"{rule.marker_name} marker")


def idempotency_key(obj: ObjectCreated) -> str:
    """One key per object version: redelivered or duplicated notifications map to one job."""
    key = f"bucket:{obj.dedup_key}"
    if len(key) > _MAX_IDEMPOTENCY_KEY:  # S3 keys may be 1,024 bytes long
        key = "bucket:sha256:" + hashlib.sha256(obj.dedup_key.encode()).hexdigest()
    return key


async def decide(obj: ObjectCreated, rule: TriggerSettings, objects: ObjectStore) -> Decision:
    """Raises whatever the object store raises when the config lookup fails (retry later)."""
    found = classify(obj, rule)
    if isinstance(found, Ignored):
        return Decision(found.reason, notable=found.notable)
    config_key = found.directory + rule.config_name
    config_uri = rule.default_config_uri
    if await objects.head(obj.bucket, config_key) is not None:
        config_uri = f"s3://{obj.bucket}/{config_key}"
    request = TrainRequest(
        dataset_uri=found.dataset_uri,
        config_uri=config_uri,
        register_model=rule.register_model,
        model_name=rule.model_name,
        idempotency_key=idempotency_key(obj),
    )
    return Decision(f"dataset {found.kind}", request)
