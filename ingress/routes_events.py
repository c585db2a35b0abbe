"""The bucket-event webhook: MinIO's webhook target, or anything that POSTs S3 event JSON."""

from __future__ import annotations

from aiohttp import web

from ingress.deps import DEPS
from ingress.errors import RequestInvalid
from ingress.http import json_response
from ingress.models import BucketEventsResult, FieldProblem
from ingress.validation import ROOT, parse_json_object
from schemas.bucket_events import BucketEventError


async def head_events(request: web.Request) -> web.Response:
    # MinIO checks that the endpoint is up with a HEAD before it enables the target.
    return web.Response(status=200)


async def post_events(request: web.Request) -> web.Response:
    """200 with one result per created object; 503 (the sender retries) when the bus or a
    store is down, after which the objects already started are answered as duplicates."""
    deps = request.app[DEPS]
    payload = parse_json_object(await request.read(), "bucket event")
    try:
        results = await deps.bucket_events.handle(payload)
    except BucketEventError as exc:
        raise RequestInvalid("bucket event", [FieldProblem(field=ROOT, message=str(exc), type="bucket_event")]) from None
    return json_response(BucketEventsResult(results=results))
