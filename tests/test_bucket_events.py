"""Bucket notifications of every shape we accept, normalised to ObjectCreated.

The moto fixtures are verbatim bodies moto 5 put on an SQS queue (times fixed); the AWS,
EventBridge and MinIO ones follow the documented/observed shapes of each service.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest

from schemas import BucketEventError, ObjectCreated, parse_bucket_event

# --- fixtures -------------------------------------------------------------------------------------

# moto: put_object(Key="datasets/my data(1).zip"); the key is quote_plus-encoded, '/' included,
# there is no sequencer and no versionId.
MOTO_PUT = (
    '{"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", '
    '"eventTime": "2026-11-27T18:58:51.452Z", "eventName": "ObjectCreated:Put", "s3": {"s3SchemaVersion": "1.0", '
    '"configurationId": "Qm5MjA0tUxDOEGsubA0rHWOLrILjOd14Am9jxMKvcjbFSpqVK7", "bucket": {"name": "datasets", '
    '"arn": "arn:aws:s3:::datasets"}, "object": {"key": "datasets%2Fmy+data%281%29.zip", "size": 1, '
    '"eTag": "9dd4e461268c8034f5c8564e155c67a6"}}}]}'
)

# moto: a two-part multipart upload produces these two bodies, same key and ETag.
MOTO_MULTIPART = [
    '{"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", '
    '"eventTime": "2026-11-27T18:58:51.711Z", "eventName": "ObjectCreated:Put", "s3": {"s3SchemaVersion": "1.0", '
    '"configurationId": "Qm5MjA0tUxDOEGsubA0rHWOLrILjOd14Am9jxMKvcjbFSpqVK7", "bucket": {"name": "datasets", '
    '"arn": "arn:aws:s3:::datasets"}, "object": {"key": "big%2Flevir.tar.gz", "size": 5242881, '
    '"eTag": "e5a8c5272b26fc10581a21089559b006-2"}}}]}',
    '{"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", '
    '"eventTime": "2026-11-27T18:58:51.711Z", "eventName": "ObjectCreated:CompleteMultipartUpload", "s3": '
    '{"s3SchemaVersion": "1.0", "configurationId": "Qm5MjA0tUxDOEGsubA0rHWOLrILjOd14Am9jxMKvcjbFSpqVK7", '
    '"bucket": {"name": "datasets", "arn": "arn:aws:s3:::datasets"}, "object": {"key": "big%2Flevir.tar.gz", '
    '"size": 5242881, "eTag": "e5a8c5272b26fc10581a21089559b006-2"}}}]}',
]

MOTO_TEST_EVENT = '{"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-27T18:58:51.435Z", "Bucket": "datasets"}'

AWS_TEST_EVENT = {
    "Service": "Amazon S3",
    "Event": "s3:TestEvent",
    "Time": "2025-03-01T12:00:00.000Z",
    "Bucket": "datasets",
    "RequestId": "5582815E1AEA5ADF",
    "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
}


def aws_record(
    key: str = "levir%2Dcd/train+set.zip",
    event_name: str = "ObjectCreated:Put",
    etag: str | None = "0123456789abcdef0123456789abcdef",
) -> dict[str, Any]:
    obj: dict[str, Any] = {"key": key, "size": 1024, "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko", "sequencer": "0055AED6DCD90281E5"}
    if etag is not None:
        obj["eTag"] = etag
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "eu-west-1",
        "eventTime": "2025-03-01T12:00:00.000Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "datasets-created",
            "bucket": {"name": "datasets", "ownerIdentity": {"principalId": "A3NL1KOZZKExample"}, "arn": "arn:aws:s3:::datasets"},
            "object": obj,
        },
    }


def sqs_message(body: str) -> dict[str, Any]:
    """An SQS message as ReceiveMessage returns it."""
    return {"MessageId": "c6b3e5a1-1d8f-4f2e-9d3a-7c6f4e1b2a90", "ReceiptHandle": "AQEB...", "MD5OfBody": "x", "Body": body}


def sns_envelope(message: str) -> dict[str, Any]:
    return {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:eu-west-1:123456789012:dataset-uploads",
        "Subject": "Amazon S3 Notification",
        "Message": message,
        "Timestamp": "2025-03-01T12:00:00.100Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-example.pem",
        "UnsubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe",
    }


EVENTBRIDGE = {
    "version": "0",
    "id": "17793124-05d4-b198-2fde-7ededc63b103",
    "detail-type": "Object Created",
    "source": "aws.s3",
    "account": "111122223333",
    "time": "2025-03-01T12:00:00Z",
    "region": "eu-west-1",
    "resources": ["arn:aws:s3:::datasets"],
    "detail": {
        "version": "0",
        "bucket": {"name": "datasets"},
        "object": {
            # EventBridge keys are not URL-encoded: '+' here is a literal plus.
            "key": "raw/2025-03-01T12:00:00/levir+v2.zip",
            "size": 198524144,
            "etag": "4af981f98d22a0b9979da24b259e5e42-12",
            "version-id": "uhggCJ2_B6gU2JaXWXebnXFDstO0ID6G",
            "sequencer": "0064D3901D00059242",
        },
        "request-id": "XRRTKJXSZQCWNQR1",
        "requester": "111122223333",
        "source-ip-address": "127.0.0.1",
        "reason": "CompleteMultipartUpload",
    },
}

MINIO = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "datasets/levir cd/tiles.tar.gz",
    "Records": [
        {
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "awsRegion": "",
            "eventTime": "2025-03-01T12:00:00.716Z",
            "eventName": "s3:ObjectCreated:Put",
            "userIdentity": {"principalId": "minioadmin"},
            "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "127.0.0.1"},
            "responseElements": {
                "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
                "x-amz-request-id": "17CB9B6B5D3C33A1",
                "x-minio-deployment-id": "7b0f8a4e-6a3c-4d0e-9a61-2f3c1e5b8d77",
                "x-minio-origin-endpoint": "http://127.0.0.1:9000",
            },
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "Config",
                "bucket": {"name": "datasets", "ownerIdentity": {"principalId": "minioadmin"}, "arn": "arn:aws:s3:::datasets"},
                "object": {
                    "key": "levir+cd%2Ftiles.tar.gz",
                    "size": 1048576,
                    "eTag": "\"5eb63bbbe01eeed093cb22bb8f5acdc3\"",
                    "contentType": "application/gzip",
                    "userMetadata": {"content-type": "application/gzip"},
                    "sequencer": "17CB9B6B5D6B1B5E",
                },
            },
            "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70 mc/RELEASE.2024-04-29T09-56-05Z"},
        }
    ],
}


# --- shapes --------------------------------------------------------------------------------------------


def test_moto_put_from_sqs_body_is_url_decoded() -> None:
    [obj] = parse_bucket_event(MOTO_PUT)
    assert obj == ObjectCreated(
        bucket="datasets",
        key="datasets/my data(1).zip",
        size=1,
        etag="9dd4e461268c8034f5c8564e155c67a6",
        version_id=None,
        sequencer=None,
        event_time=datetime(2026, 11, 27, 18, 58, 51, 452000, tzinfo=timezone.utc),
        event_name="ObjectCreated:Put",
        source="aws",
    )
    assert obj.uri == "s3://datasets/datasets/my data(1).zip"


@pytest.mark.parametrize("as_type", [str, bytes, json.loads])
def test_payload_types(as_type: Any) -> None:
    payload = as_type(MOTO_PUT.encode() if as_type is bytes else MOTO_PUT)
    assert [o.key for o in parse_bucket_event(payload)] == ["datasets/my data(1).zip"]


def test_moto_multipart_upload_gives_two_events_with_one_dedup_key() -> None:
    first, second = (parse_bucket_event(body)[0] for body in MOTO_MULTIPART)
    assert first.event_name == "ObjectCreated:Put"
    assert second.event_name == "ObjectCreated:CompleteMultipartUpload"
    assert first.key == second.key == "big/levir.tar.gz"
    assert first.dedup_key == second.dedup_key == "s3://datasets/big/levir.tar.gz#e5a8c5272b26fc10581a21089559b006-2"


def test_aws_notification_records() -> None:
    payload = {"Records": [aws_record(), aws_record(key="other.zip", etag="\"quoted\"")]}
    first, second = parse_bucket_event(payload)
    assert first.key == "levir-cd/train set.zip"  # %2D and '+' decoded
    assert first.version_id == "096fKKXTRTtl3on89fVO.nfljtsv6qko"
    assert first.sequencer == "0055AED6DCD90281E5"
    assert first.size == 1024
    assert first.source == "aws"
    assert first.dedup_key.endswith("#096fKKXTRTtl3on89fVO.nfljtsv6qko")  # the version wins over the ETag
    assert second.etag == "quoted"


def test_sqs_receive_message_wrapper() -> None:
    assert [o.key for o in parse_bucket_event(sqs_message(MOTO_PUT))] == ["datasets/my data(1).zip"]


def test_lambda_style_sqs_records() -> None:
    payload = {"Records": [{"messageId": "m1", "eventSource": "aws:sqs", "body": MOTO_PUT, "awsRegion": "us-east-1"}]}
    assert [o.key for o in parse_bucket_event(payload)] == ["datasets/my data(1).zip"]


def test_sns_envelope() -> None:
    payload = sns_envelope(json.dumps({"Records": [aws_record()]}))
    [obj] = parse_bucket_event(payload)
    assert obj.key == "levir-cd/train set.zip"


def test_sns_envelope_inside_sqs_body() -> None:
    body = json.dumps(sns_envelope(json.dumps({"Records": [aws_record()]})))
    [obj] = parse_bucket_event(sqs_message(body))
    assert obj.bucket == "datasets"


def test_lambda_style_sns_records() -> None:
    payload = {"Records": [{"EventSource": "aws:sns", "Sns": {"Type": "Notification", "Message": json.dumps({"Records": [aws_record()]})}}]}
    assert len(parse_bucket_event(payload)) == 1


def test_eventbridge_object_created() -> None:
    [obj] = parse_bucket_event(EVENTBRIDGE)
    assert obj.bucket == "datasets"
    assert obj.key == "raw/2025-03-01T12:00:00/levir+v2.zip"  # not URL-decoded
    assert obj.size == 198524144
    assert obj.etag == "4af981f98d22a0b9979da24b259e5e42-12"
    assert obj.version_id == "uhggCJ2_B6gU2JaXWXebnXFDstO0ID6G"
    assert obj.sequencer == "0064D3901D00059242"
    assert obj.event_time == datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    assert obj.event_name == "ObjectCreated:CompleteMultipartUpload"
    assert obj.source == "aws"


def test_eventbridge_as_moto_sends_it() -> None:
    # moto: unix time, "eTag" spelling, version-id null, reason "ObjectCreated".
    payload = json.loads(json.dumps(EVENTBRIDGE))
    payload["time"] = 1740830400.0
    payload["detail"]["object"] = {"key": "a b.zip", "size": 3, "eTag": "abc", "version-id": None, "sequencer": "617f08299329d189"}
    payload["detail"]["reason"] = "ObjectCreated"
    [obj] = parse_bucket_event(payload)
    assert (obj.key, obj.etag, obj.version_id) == ("a b.zip", "abc", None)
    assert obj.event_time == datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    assert obj.event_name == "ObjectCreated:*"


def test_eventbridge_other_detail_types_ignored() -> None:
    payload = {**EVENTBRIDGE, "detail-type": "Object Deleted"}
    assert parse_bucket_event(payload) == []


def test_minio_envelope() -> None:
    [obj] = parse_bucket_event(json.dumps(MINIO).encode())
    assert obj.bucket == "datasets"
    assert obj.key == "levir cd/tiles.tar.gz"
    assert obj.etag == "5eb63bbbe01eeed093cb22bb8f5acdc3"  # quotes stripped
    assert obj.sequencer == "17CB9B6B5D6B1B5E"
    assert obj.event_name == "ObjectCreated:Put"  # 's3:' prefix removed
    assert obj.source == "minio"
    trigger = obj.to_trigger()
    assert (trigger.bucket, trigger.key, trigger.etag, trigger.sequencer) == (
        "datasets", "levir cd/tiles.tar.gz", "5eb63bbbe01eeed093cb22bb8f5acdc3", "17CB9B6B5D6B1B5E")


def test_minio_prefix_alone_marks_minio() -> None:
    record = aws_record(event_name="s3:ObjectCreated:Copy")
    [obj] = parse_bucket_event({"Records": [record]})
    assert (obj.source, obj.event_name) == ("minio", "ObjectCreated:Copy")


# --- ignored ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [MOTO_TEST_EVENT, AWS_TEST_EVENT, sqs_message(MOTO_TEST_EVENT), sns_envelope(MOTO_TEST_EVENT)])
def test_test_events_are_ignored(payload: Any) -> None:
    assert parse_bucket_event(payload) == []


@pytest.mark.parametrize(
    "event_name",
    ["ObjectRemoved:Delete", "ObjectRemoved:DeleteMarkerCreated", "s3:ObjectRemoved:Delete", "ObjectRestore:Completed",
     "s3:ObjectAccessed:Get", "LifecycleExpiration:Delete", "ObjectTagging:Put"],
)
def test_non_create_events_are_ignored(event_name: str) -> None:
    assert parse_bucket_event({"Records": [aws_record(event_name=event_name)]}) == []


def test_mixed_records_keep_only_creations() -> None:
    payload = {"Records": [aws_record(event_name="ObjectRemoved:Delete"), aws_record(key="keep.zip")]}
    assert [o.key for o in parse_bucket_event(payload)] == ["keep.zip"]


def test_empty_records() -> None:
    assert parse_bucket_event({"Records": []}) == []


def test_sns_subscription_confirmation_is_not_an_event() -> None:
    assert parse_bucket_event({"Type": "SubscriptionConfirmation", "Message": "You have chosen to subscribe"}) == []


# --- malformed -----------------------------------------------------------------------------------------


def _without(path: list[str]) -> dict[str, Any]:
    record = aws_record()
    target = record
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return {"Records": [record]}


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\xff\xfe", "not UTF-8"),
        ("{not json", "not JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ({"hello": "world"}, "not a bucket notification"),
        ({"Records": "nope"}, "Records must be a list"),
        ({"Records": [42]}, "Records[0] must be an object"),
        (_without(["eventName"]), "Records[0].eventName is missing"),
        (_without(["s3", "bucket", "name"]), "Records[0].s3.bucket.name is missing"),
        (_without(["s3", "object", "key"]), "Records[0].s3.object.key is missing"),
        (_without(["s3"]), "Records[0].s3 is missing"),
        ({"Records": [{**aws_record(), "eventTime": "yesterday"}]}, "event_time"),
        (sns_envelope("{broken"), "payload.Message is not JSON"),
        ({"Type": "Notification", "Message": 7}, "Message is missing or not a non-empty string"),
        (sqs_message('{"Records": [{"eventName": "ObjectCreated:Put"}]}'), "payload.Body.Records[0].s3 is missing"),
        ({**EVENTBRIDGE, "source": "aws.ec2"}, "expected 'aws.s3'"),
        ({**EVENTBRIDGE, "detail": {"bucket": {"name": "b"}}}, "detail.object is missing"),
    ],
)
def test_malformed_payloads_raise_clear_errors(payload: Any, fragment: str) -> None:
    with pytest.raises(BucketEventError) as info:
        parse_bucket_event(payload)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_negative_size_is_rejected() -> None:
    record = aws_record()
    record["s3"]["object"]["size"] = -1
    with pytest.raises(BucketEventError, match="size"):
        parse_bucket_event({"Records": [record]})


def test_nesting_is_bounded() -> None:
    payload: Any = {"Records": [aws_record()]}
    for _ in range(6):
        payload = sns_envelope(json.dumps(payload))
    with pytest.raises(BucketEventError, match="nested more than"):
        parse_bucket_event(payload)
