"""Bucket notifications, normalised: whatever delivered it, an object creation becomes ObjectCreated.

Accepted shapes (:func:`parse_bucket_event`):

- AWS S3 event notification ``{"Records": [{"eventName": "ObjectCreated:Put", "s3": {...}}]}``
  (``eventName`` without the ``s3:`` prefix; object keys URL-encoded, ``+`` for spaces);
- the same as the body of an SQS message (a ReceiveMessage entry ``{"Body": "..."}`` or a
  Lambda-style ``{"Records": [{"eventSource": "aws:sqs", "body": "..."}]}``);
- the same inside an SNS envelope ``{"Type": "Notification", "Message": "<json>"}`` (also as an
  SQS body, or a Lambda-style ``{"Records": [{"EventSource": "aws:sns", "Sns": {...}}]}``);
- EventBridge ``{"detail-type": "Object Created", "source": "aws.s3", "detail": {...}}`` (keys
  are not URL-encoded there: the documented examples carry raw ``:`` that notifications encode);
- MinIO webhook/AMQP/Kafka targets ``{"EventName": "s3:ObjectCreated:Put", "Key":
  "bucket/key", "Records": [...]}`` (``eventName`` with the ``s3:`` prefix).

``s3:TestEvent`` (sent when notifications are configured), SNS subscription confirmations and
every non-creation event (ObjectRemoved, ObjectRestore, tagging...) yield no objects.
"""

from __future__ import annotations

import json
from typing import Any, Literal
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.jobs import BucketTrigger, UtcDatetime

CREATED_PREFIX = "ObjectCreated:"
# EventBridge names the API call ("reason"); notifications name the event. Map to the latter.
_EVENTBRIDGE_REASONS = {
    "PutObject": "Put",
    "PostObject": "Post",
    "CopyObject": "Copy",
    "CompleteMultipartUpload": "CompleteMultipartUpload",
    "ObjectCreated": "*",  # moto's reason
}
_MAX_NESTING = 4  # SNS in SQS in a Lambda record is 3 levels; anything deeper is not ours


class BucketEventError(ValueError):
    """A payload that is not a bucket notification we understand; the message says why."""


class ObjectCreated(BaseModel):
    """One object that appeared in a bucket."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str = Field(min_length=1)
    key: str = Field(min_length=1, description="Decoded object key (no URL encoding).")
    size: int | None = Field(None, ge=0)
    etag: str | None = Field(None, description="Without surrounding quotes.")
    version_id: str | None = None
    sequencer: str | None = None
    event_time: UtcDatetime | None = None
    event_name: str = Field("ObjectCreated:Put", description="Without the 's3:' prefix.")
    source: Literal["minio", "aws", "local"]

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def dedup_key(self) -> str:
        """The same for every notification of one object version.

        Notifications are at-least-once, and a multipart upload may be announced twice (moto
        sends ObjectCreated:Put and ObjectCreated:CompleteMultipartUpload with the same ETag):
        use this as the idempotency key of the job it submits.
        """
        revision = self.version_id or self.etag or self.sequencer or ""
        return f"{self.uri}#{revision}"

    def to_trigger(self) -> BucketTrigger:
        return BucketTrigger(
            bucket=self.bucket,
            key=self.key,
            etag=self.etag,
            version_id=self.version_id,
            sequencer=self.sequencer,
            event_time=self.event_time,
        )


def parse_bucket_event(payload: dict[str, Any] | bytes | str) -> list[ObjectCreated]:
    """Every object creation announced by ``payload``; ``[]`` for test and non-create events.

    Raises :class:`BucketEventError` for anything that is not one of the shapes in the module
    docstring.
    """
    return _parse(_load(payload, "payload"), "payload", 0)


def _load(payload: Any, where: str) -> Any:
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BucketEventError(f"{where} is not UTF-8: {exc}") from None
    if isinstance(payload, str):
        try:
            return json.loads(payload)
        except json.JSONDecodeError as exc:
            raise BucketEventError(f"{where} is not JSON: {exc}") from None
    return payload


def _parse(doc: Any, where: str, depth: int) -> list[ObjectCreated]:
    if depth > _MAX_NESTING:
        raise BucketEventError(f"{where}: envelopes nested more than {_MAX_NESTING} deep")
    if not isinstance(doc, dict):
        raise BucketEventError(f"{where} must be a JSON object, got {type(doc).__name__}")

    if doc.get("Event") == "s3:TestEvent":
        return []
    if doc.get("Type") in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
        return []  # SNS control messages, not events
    if doc.get("Type") == "Notification" and "Message" in doc:
        return _parse(_load(_str(doc, "Message", where), f"{where}.Message"), f"{where}.Message", depth + 1)
    if "detail-type" in doc and "detail" in doc:
        return _eventbridge(doc, where)
    if "Records" in doc:
        return _records(doc, where, depth)
    if isinstance(doc.get("Body"), str):  # an SQS message as ReceiveMessage returns it
        return _parse(_load(doc["Body"], f"{where}.Body"), f"{where}.Body", depth + 1)
    raise BucketEventError(
        f"{where} is not a bucket notification: expected 'Records' (S3/MinIO/SQS), an SNS "
        f"'Notification', an EventBridge event or an s3:TestEvent; got keys {sorted(doc)[:8]}"
    )


def _records(doc: dict[str, Any], where: str, depth: int) -> list[ObjectCreated]:
    records = doc["Records"]
    if not isinstance(records, list):
        raise BucketEventError(f"{where}.Records must be a list")
    minio_envelope = isinstance(doc.get("EventName"), str)
    created: list[ObjectCreated] = []
    for i, record in enumerate(records):
        here = f"{where}.Records[{i}]"
        if not isinstance(record, dict):
            raise BucketEventError(f"{here} must be an object")
        event_source = record.get("eventSource") or record.get("EventSource")
        if event_source == "aws:sqs":
            created += _parse(_load(_str(record, "body", here), f"{here}.body"), f"{here}.body", depth + 1)
        elif event_source == "aws:sns":
            sns = _obj(record, "Sns", here)
            message = _str(sns, "Message", f"{here}.Sns")
            created += _parse(_load(message, f"{here}.Sns.Message"), f"{here}.Sns.Message", depth + 1)
        else:
            item = _s3_record(record, here, minio_envelope)
            if item is not None:
                created.append(item)
    return created


def _s3_record(record: dict[str, Any], where: str, minio_envelope: bool) -> ObjectCreated | None:
    raw_name = _str(record, "eventName", where)
    name = raw_name.removeprefix("s3:")
    if not name.startswith(CREATED_PREFIX):
        return None
    event_source = str(record.get("eventSource") or "")
    source: Literal["minio", "aws"] = (
        "minio" if minio_envelope or raw_name.startswith("s3:") or event_source.startswith("minio") else "aws"
    )
    s3 = _obj(record, "s3", where)
    bucket = _obj(s3, "bucket", f"{where}.s3")
    obj = _obj(s3, "object", f"{where}.s3")
    return _build(
        where,
        bucket=_str(bucket, "name", f"{where}.s3.bucket"),
        # Notification keys are URL-encoded with '+' for spaces (moto also encodes '/').
        key=unquote_plus(_str(obj, "key", f"{where}.s3.object")),
        size=obj.get("size"),
        etag=_etag(obj.get("eTag", obj.get("etag"))),
        version_id=obj.get("versionId") or None,
        sequencer=obj.get("sequencer") or None,
        event_time=record.get("eventTime") or None,
        event_name=name,
        source=source,
    )


def _eventbridge(doc: dict[str, Any], where: str) -> list[ObjectCreated]:
    if doc.get("source") != "aws.s3":
        raise BucketEventError(f"{where}: EventBridge event from {doc.get('source')!r}, expected 'aws.s3'")
    if doc["detail-type"] != "Object Created":
        return []
    detail = _obj(doc, "detail", where)
    bucket = _obj(detail, "bucket", f"{where}.detail")
    obj = _obj(detail, "object", f"{where}.detail")
    reason = detail.get("reason") if isinstance(detail.get("reason"), str) else ""
    item = _build(
        f"{where}.detail",
        bucket=_str(bucket, "name", f"{where}.detail.bucket"),
        key=_str(obj, "key", f"{where}.detail.object"),
        size=obj.get("size"),
        etag=_etag(obj.get("etag", obj.get("eTag"))),  # moto spells it eTag
        version_id=obj.get("version-id") or None,
        sequencer=obj.get("sequencer") or None,
        event_time=doc.get("time") or None,
        event_name=CREATED_PREFIX + _EVENTBRIDGE_REASONS.get(reason, reason or "*"),
        source="aws",
    )
    return [item]


def _build(where: str, **fields: Any) -> ObjectCreated:
    try:
        return ObjectCreated(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        )
        raise BucketEventError(f"{where}: {problems}") from None


def _etag(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BucketEventError(f"etag must be a string, got {value!r}")
    return value.strip('"') or None


def _obj(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise BucketEventError(f"{where}.{key} is missing or not an object")
    return value


def _str(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise BucketEventError(f"{where}.{key} is missing or not a non-empty string")
    return value
