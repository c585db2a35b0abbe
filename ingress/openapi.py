"""The OpenAPI 3.1 document of the ingress's HTTP API (served at ``GET /openapi.json``).

Schemas come from the pydantic models the handlers really build or parse, through
``model_json_schema(ref_template="#/components/schemas/{model}")``; each model's ``$defs`` go to
``components/schemas``. Only the few bodies no model describes (``/healthz``, ``/metrics``, the
bucket notification, this document itself) are written here. Status codes are those the handlers and
:func:`ingress.http.error_middleware` answer; tests/test_openapi.py compares the document with
the app's routes, and tests/test_api_fuzz.py checks the running ingress against it.

The document depends only on the code and the package version, so it is built once per app
(:class:`ingress.routes_docs.ApiDocs`) and never per request.
"""

from __future__ import annotations

import copy
from importlib import metadata
from typing import Any, Literal

from pydantic import BaseModel

from ingress.models import (
    Accepted,
    BucketEventsResult,
    CancelAccepted,
    ErrorBody,
    JobList,
    Readiness,
    SseEnd,
)
from schemas.events import STATUS_DATA_SCHEMA, STATUS_DATA_SCHEMA_PATH, StatusEvent
from schemas.jobs import JOB_ID_PATTERN, JobState, JobView, TrainRequest
from schemas.tracing import TRACEPARENT_PATTERN

__all__ = ["OPENAPI_VERSION", "REF_TEMPLATE", "build_openapi", "package_version"]

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"
_PACKAGE = "cdtrain"

Mode = Literal["validation", "serialization"]
Json = dict[str, Any]

# What each error status means when an operation says nothing more specific.
_ERRORS: dict[int, str] = {
    400: "The body is not JSON (strictly: NaN, Infinity and numbers beyond a double are not), or is "
         "nested too deeply to read.",
    401: "The bearer token is missing or wrong (`WWW-Authenticate: Bearer`).",
    403: "A dataset or config location outside CDTRAIN_ALLOWED_URIS; `field` names it.",
    404: "No such job (or not a valid job id).",
    409: "Conflict: see the operation.",
    413: "The body is larger than the ingress accepts (1 MiB by default).",
    422: "Not an acceptable request: `field` names the first bad field, `details` lists every problem.",
    503: "A dependency (message bus, job view store, object store) cannot serve now. Nothing was "
         "accepted, so a retry (after `Retry-After` seconds) is safe.",
}


def package_version() -> str:
    """The installed package's version (the document's ``info.version``)."""
    try:
        return metadata.version(_PACKAGE)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


class _Schemas:
    """``components/schemas``, filled from pydantic models; refuses two different schemas under
    one name (a validation and a serialization schema that differ, say) instead of losing one."""

    def __init__(self) -> None:
        self.components: dict[str, Json] = {}

    def ref(self, model: type[BaseModel], mode: Mode = "serialization") -> Json:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode=mode)
        for name, definition in schema.pop("$defs", {}).items():
            self._add(name, definition)
        self._add(model.__name__, schema)
        return {"$ref": REF_TEMPLATE.format(model=model.__name__)}

    def _add(self, name: str, schema: Json) -> None:
        known = self.components.setdefault(name, schema)
        if known != schema:
            raise ValueError(f"two different JSON schemas are named {name!r}; rename one of the models")


def _content(schema: Json, media_type: str = "application/json") -> Json:
    return {media_type: {"schema": schema}}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}}
_LOCATION = {"Location": {"description": "The job's URL (`/train/{job_id}`).", "required": True,
                          "schema": {"type": "string"}}}
_TRACEPARENT_DESCRIPTION = ("W3C Trace Context: the job's trace. A valid `traceparent` sent with the request is "
                            "continued (an invalid or missing one starts a new trace); every status event of the "
                            "job carries a span of this trace (CloudEvents attribute `traceparent`).")
_TRACEPARENT = {"traceparent": {"description": _TRACEPARENT_DESCRIPTION, "required": False,
                                "schema": {"type": "string", "pattern": TRACEPARENT_PATTERN}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer realm=\"...\"`", "required": True,
                                          "schema": {"type": "string", "pattern": "^Bearer"}}}


def _errors(schemas: _Schemas, *codes: int, **descriptions: str) -> dict[str, Json]:
    """Error answers (``{"error": ...}``); ``descriptions`` override by ``e<code>=...``."""
    body = _content(schemas.ref(ErrorBody))
    out: dict[str, Json] = {}
    for code in codes:
        response: Json = {"description": descriptions.get(f"e{code}", _ERRORS[code]), "content": body}
        if code == 503:
            response["headers"] = _RETRY_AFTER
        elif code == 401:
            response["headers"] = _WWW_AUTHENTICATE
        out[str(code)] = response
    return out


def _job_id_parameter() -> Json:
    # An id that does not match is answered 404 like an unknown one (never 422).
    return {"name": "job_id", "in": "path", "required": True, "description": "The job's id.",
            "schema": {"type": "string", "pattern": JOB_ID_PATTERN}}


def _job_links() -> Json:
    """From a submission to the job it names (clients, and stateful fuzzing, follow these)."""
    job_id = {"job_id": "$response.body#/job_id"}
    return {
        "GetJob": {"operationId": "getJob", "parameters": job_id, "description": "The job's view."},
        "CancelJob": {"operationId": "cancelJob", "parameters": job_id, "description": "Cancel the job."},
        "StreamJobEvents": {"operationId": "streamJobEvents", "parameters": job_id,
                            "description": "Follow the job live."},
    }


def _sse_event(event: str, data: Json, *, with_id: bool) -> Json:
    """One Server-Sent Event as schemathesis and SSE clients read it: ``event``, ``id``,
    ``data`` (a JSON document of its own)."""
    properties: Json = {"event": {"const": event},
                        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data}}
    if with_id:
        properties["id"] = {"type": "string", "pattern": "^[0-9]+$"}
    return {"type": "object", "required": ["event", "data"], "properties": properties}


def _train_paths(schemas: _Schemas) -> dict[str, Json]:
    api = [{"apiToken": []}]
    job = _job_id_parameter()
    states = [state.value for state in JobState]
    accepted = _content(schemas.ref(Accepted))
    return {
        "/train": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a training job",
                "description": "202 once the broker has confirmed the request into its durable queue "
                               "(the job view exists before the answer); 200 when `idempotency_key` "
                               "names an existing job with the same request.",
                "security": api,
                "parameters": [{"name": "traceparent", "in": "header", "required": False,
                                "description": _TRACEPARENT_DESCRIPTION, "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": _content(schemas.ref(TrainRequest, "validation"))},
                "responses": {
                    "202": {"description": "A new job was accepted.", "headers": {**_LOCATION, **_TRACEPARENT},
                            "content": accepted, "links": _job_links()},
                    "200": {"description": "`idempotency_key` was used before with the same request: the "
                                           "existing job, `duplicate: true` (`traceparent`: that job's trace).",
                            "headers": {**_LOCATION, **_TRACEPARENT}, "content": accepted, "links": _job_links()},
                    **_errors(schemas, 400, 401, 403, 409, 413, 422, 503,
                              e409="`idempotency_key` was used before with a different request; `job_id` "
                                   "names that job.",
                              e503="The bus did not confirm the request, or the view store (needed first) "
                                   "does not answer. Nothing was accepted: retrying is safe."),
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "List jobs, newest first, paged",
                "security": api,
                "parameters": [
                    {"name": "limit", "in": "query", "required": False,
                     "description": "Page size (an empty value is refused, as a bad one is).",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}},
                    {"name": "cursor", "in": "query", "required": False,
                     "description": "`next_cursor` of the previous page (empty: the first page).",
                     "schema": {"type": "string"}},
                    {"name": "status", "in": "query", "required": False,
                     "description": "Only jobs in this state, in either case (`running` or `RUNNING`); an "
                                    "empty value is refused, never read as no filter.",
                     "schema": {"type": "string", "enum": states}},
                ],
                "responses": {
                    "200": {"description": "One page of job views.", "content": _content(schemas.ref(JobList))},
                    **_errors(schemas, 401, 422, 503,
                              e422="A bad `limit`, `status` or `cursor` (named in `field`)."),
                },
            },
        },
        "/train/{job_id}": {
            "parameters": [job],
            "get": {
                "operationId": "getJob",
                "summary": "One job's view",
                "security": api,
                "responses": {
                    "200": {"description": "The job's view.", "content": _content(schemas.ref(JobView))},
                    **_errors(schemas, 401, 404, 503),
                },
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel a queued or running job",
                "description": "A queued job never starts; a running one stops at its next training step "
                               "and ends CANCELLED. The job stays readable.",
                "security": api,
                "responses": {
                    "202": {"description": "The cancel is recorded (again, for a repeated DELETE while the "
                                           "job is being cancelled).",
                            "headers": _LOCATION, "content": _content(schemas.ref(CancelAccepted))},
                    **_errors(schemas, 401, 404, 409, 503,
                              e409="The job already ended; `state` and the message say how and when.",
                              e503="The view store could not record the request; nothing changed."),
                },
            },
        },
        "/train/{job_id}/events": {
            "parameters": [job],
            "get": {
                "operationId": "streamJobEvents",
                "summary": "Follow a job's status live (Server-Sent Events)",
                "description": "`retry: 3000`, then a `view` event (the JobView), a `status` event per newer "
                               "status event (CloudEvents), `: ping` comments, and `end` at a terminal "
                               "state, after which the server closes the stream.",
                "security": api,
                "responses": {
                    "200": {"description": "The event stream.", "content": {"text/event-stream": {"schema": {
                        "oneOf": [
                            _sse_event("view", schemas.ref(JobView), with_id=True),
                            _sse_event("status", schemas.ref(StatusEvent), with_id=True),
                            _sse_event("end", schemas.ref(SseEnd), with_id=False),
                        ]}}}},
                    **_errors(schemas, 401, 404, 503, e503="The bus cannot subscribe to the job's events, "
                                                           "or the view store does not answer."),
                },
            },
        },
    }


def _bucket_paths(schemas: _Schemas) -> dict[str, Json]:
    return {
        "/events/s3": {
            "head": {
                "operationId": "probeBucketEvents",
                "summary": "Endpoint check (MinIO probes the webhook with it)",
                "security": [],
                "responses": {"200": {"description": "The endpoint is up."}},
            },
            "post": {
                "operationId": "postBucketEvents",
                "summary": "S3/MinIO bucket notification webhook",
                "description": "AWS S3 notifications, SQS/SNS envelopes, EventBridge and MinIO's envelope. "
                               "One result per created object: a job started, a duplicate, or ignored with "
                               "the reason.",
                "security": [{"webhookToken": []}],
                "requestBody": {"required": True, "content": {"application/json": {
                    # Several envelopes (schemas/bucket_events.py reads them); any JSON object may be one.
                    "schema": {"type": "object"},
                    "example": {"Records": [{
                        "eventName": "ObjectCreated:Put",
                        "eventTime": "2026-01-01T00:00:00.000Z",
                        "s3": {"bucket": {"name": "lake"},
                               "object": {"key": "datasets/levir.zip", "size": 1024, "eTag": "0123abcd"}},
                    }]},
                }}},
                "responses": {
                    "200": {"description": "What each created object did.",
                            "content": _content(schemas.ref(BucketEventsResult))},
                    **_errors(schemas, 400, 401, 413, 422, 503,
                              e400=_ERRORS[400] + " Do not retry.",
                              e422="JSON, but not a bucket notification (do not retry).",
                              e503="The bus or a store is down: retry; objects that already started a job "
                                   "are then answered as duplicates."),
                },
            },
        },
    }


def _probe_and_doc_paths(schemas: _Schemas) -> dict[str, Json]:
    readiness = _content(schemas.ref(Readiness))
    return {
        "/healthz": {"get": {
            "operationId": "healthz",
            "summary": "Liveness: the process answers",
            "security": [],
            "responses": {"200": {"description": "`{\"status\": \"ok\"}`", "content": _content(
                # No model: the handler answers this one constant body.
                {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}})}},
        }},
        "/readyz": {"get": {
            "operationId": "readyz",
            "summary": "Readiness: the bus and the view store are reachable",
            "security": [],
            "responses": {
                "200": {"description": "Ready.", "content": readiness},
                "503": {"description": "Not ready; `checks` and `error` name what is down (why, in the "
                                       "driver's words, only for a caller with the API token).",
                        "content": readiness},
            },
        }},
        "/metrics": {"get": {
            "operationId": "getMetrics",
            "summary": "Prometheus metrics of this process",
            "description": "Requests and latency by route template and status, jobs by state, queue depths "
                           "(docs/deploy.md lists them). Open, like the probes: no label names a job, a "
                           "dataset or a caller (docs/security.md).",
            "security": [],
            "responses": {"200": {
                "description": "Prometheus' text format 0.0.4; OpenMetrics when `Accept` asks for "
                               "`application/openmetrics-text`.",
                "content": {**_content({"type": "string"}, "text/plain"),
                            **_content({"type": "string"}, "application/openmetrics-text")}}},
        }},
        "/openapi.json": {"get": {
            "operationId": "getOpenApi",
            "summary": "This document",
            "security": [],
            "responses": {"200": {"description": "The OpenAPI 3.1 document.", "content": _content(
                {"type": "object", "required": ["openapi", "info", "paths"]})}},
        }},
        "/asyncapi.json": {"get": {
            "operationId": "getAsyncApi",
            "summary": "The message bus's AsyncAPI 3.0 document",
            "description": "Exchanges, queues and message payloads (train jobs, status events, cancel commands) "
                           "of this ingress's topology, generated from the code.",
            "security": [],
            "responses": {"200": {"description": "The AsyncAPI 3.0 document.", "content": _content(
                {"type": "object", "required": ["asyncapi", "info", "channels"]})}},
        }},
        STATUS_DATA_SCHEMA_PATH: {"get": {
            "operationId": "getStatusEventDataSchema",
            "summary": "The JSON Schema of a status event's data",
            "description": f"The document that status events name in `dataschema` (its `$id`: `{STATUS_DATA_SCHEMA}`).",
            "security": [],
            "responses": {"200": {"description": "A JSON Schema (2020-12).", "content": _content(
                {"type": "object", "required": ["$id", "properties"]})}},
        }},
        "/docs": {"get": {
            "operationId": "getDocs",
            "summary": "The API reference as a self-contained HTML page",
            "security": [],
            "responses": {"200": {"description": "An HTML page.", "content": _content({"type": "string"},
                                                                                     "text/html")}},
        }},
    }


def build_openapi(version: str | None = None) -> Json:
    """The whole document; ``version`` defaults to the installed package's."""
    schemas = _Schemas()
    paths = {**_train_paths(schemas), **_bucket_paths(schemas), **_probe_and_doc_paths(schemas)}
    # A deep copy: parts are shared (error bodies, headers) and a caller may edit its document.
    return copy.deepcopy({
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "cdtrain ingress",
            "version": version or package_version(),
            "description": "Submit, list, follow and cancel training jobs; bucket notifications start jobs. "
                           "Every error body is `{\"error\": ...}` (ErrorBody). Every GET also answers HEAD "
                           "(same status and headers, no body). An undocumented method on a documented path "
                           "is a 405 with `Allow`, an unknown path a 404.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                "apiToken": {"type": "http", "scheme": "bearer",
                             "description": "CDTRAIN_API_TOKEN, on /train* (off only with CDTRAIN_AUTH=none "
                                            "or in the embedded one-machine mode without a token)."},
                "webhookToken": {"type": "http", "scheme": "bearer",
                                 "description": "CDTRAIN_WEBHOOK_TOKEN, on POST /events/s3 (MinIO sends it as "
                                                "its webhook auth token; off as the API token is)."},
            },
        },
    })
