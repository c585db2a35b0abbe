"""Object storage shared by the ingress and the consumer: S3 (aioboto3) or a local directory.

No torch, no snunet_cbam here: the ingress imports this package.
"""

from infra.objects.errors import BucketNotFoundError, ObjectNotFoundError, ObjectStoreError
from infra.objects.local import LocalObjectStore
from infra.objects.models import ObjectInfo, S3Settings
from infra.objects.s3 import S3ObjectStore
from infra.objects.store import ObjectStore
from infra.objects.uri import ObjectLocation, ObjectURI, locate_object, parse_object_uri

__all__ = [
    "BucketNotFoundError",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectLocation",
    "ObjectNotFoundError",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectURI",
    "S3ObjectStore",
    "S3Settings",
    "locate_object",
    "parse_object_uri",
]
