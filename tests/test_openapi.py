"""The OpenAPI document (ingress/openapi.py) and the routes that serve it: fast, no services.

The fuzz run against the live ingress is tests/test_api_fuzz.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel, SecretStr

import ingress.routes_docs
from infra.bus import BusSettings, create_bus
from infra.objects import LocalObjectStore
from infra.views import InMemoryJobViewStore
from ingress.app import create_app
from ingress.deps import DEPS
from ingress.models import Accepted, BucketEventsResult, CancelAccepted, ErrorBody, JobList, Readiness, SseEnd
from ingress.openapi import REF_TEMPLATE, build_openapi, package_version
from ingress.settings import IngressSettings
from schemas.events import StatusEvent
from schemas.jobs import JobState, JobView, TrainRequest
from schemas.topology import Topology

API_TOKEN = "api-secret"
WEBHOOK_TOKEN = "webhook-secret"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_openapi()


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield path, method, item[method]


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def inline_schemas(document: dict[str, Any]) -> Iterator[Any]:
    """Every schema object under paths (bodies, parameters, headers), as written there."""
    for node in walk(document["paths"]):
        if isinstance(node, dict) and "schema" in node and isinstance(node["schema"], (dict, bool)):
            yield node["schema"]


def rewrite_refs(schema: Any) -> Any:
    """A model's own schema (refs to ``#/$defs/X``) as the document writes it."""
    text = json.dumps(schema).replace('"#/$defs/', '"' + REF_TEMPLATE.removesuffix("{model}"))
    return json.loads(text)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    """The real app on in-process parts, with both tokens set."""
    settings = IngressSettings(api_token=SecretStr(API_TOKEN), webhook_token=SecretStr(WEBHOOK_TOKEN),
                               instance="test")
    bus = create_bus(BusSettings(), Topology(prefix="openapi-test"))
    await bus.connect()
    app = create_app(settings, bus, InMemoryJobViewStore(), LocalObjectStore(tmp_path / "objects"))
    test_client = TestClient(TestServer(app, host="127.0.0.1"))
    await test_client.start_server()
    try:
        yield test_client
    finally:
        await test_client.close()
        await bus.close()


# --- the document -------------------------------------------------------------------------------
def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert document["info"]["version"] == package_version() != ""
    schemathesis.openapi.from_dict(document).validate()  # the OpenAPI 3.1 meta-schema
    # That meta-schema leaves schema objects to their dialect: check each against JSON Schema 2020-12.
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    for schema in inline_schemas(document):
        jsonschema_rs.meta.validate(schema)
    refs = {node["$ref"] for node in walk(document) if isinstance(node, dict) and "$ref" in node}
    assert refs, "the document refers to no component at all"
    for ref in refs:
        assert ref.removeprefix("#/components/schemas/") in document["components"]["schemas"], ref


def test_the_validation_can_fail() -> None:
    """The checks above do refuse a broken document (so their passing means something)."""
    broken = build_openapi()
    del broken["info"]
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(broken).validate()
    assert not jsonschema_rs.meta.is_valid({"type": 5})


def test_every_route_is_documented(document: dict[str, Any], tmp_path: Path) -> None:
    """The app's routes and the document's operations are the same set, both ways: a new route
    without documentation fails here."""
    app = create_app(IngressSettings(), create_bus(BusSettings(), Topology(prefix="openapi-test")),
                     InMemoryJobViewStore(), LocalObjectStore(tmp_path))
    routes = list(app.router.routes())
    get_handlers = {(r.resource.canonical, r.handler) for r in routes if r.method == "GET" and r.resource}
    served = set()
    for route in routes:
        assert route.resource is not None
        path = route.resource.canonical
        if route.method == "HEAD" and (path, route.handler) in get_handlers:
            continue  # aiohttp's implicit HEAD of a GET; the document says every GET answers HEAD
        served.add((route.method.lower(), path))
    documented = {(method, path) for path, method, _ in operations(document)}
    assert served == documented, (f"served, not documented: {sorted(served - documented)}; "
                                  f"documented, not served: {sorted(documented - served)}")
    assert {"/openapi.json", "/docs", "/metrics", "/train/{job_id}/events"} <= {path for _, path in served}


def test_train_request_schema_is_the_models(document: dict[str, Any]) -> None:
    components = document["components"]["schemas"]
    assert components["TrainRequest"] == rewrite_refs(TrainRequest.model_json_schema())
    body = document["paths"]["/train"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/TrainRequest"}


@pytest.mark.parametrize("model", [JobView, JobList, Accepted, CancelAccepted, ErrorBody, BucketEventsResult,
                                   Readiness, StatusEvent, SseEnd])
def test_response_schemas_are_the_models(model: type[BaseModel], document: dict[str, Any]) -> None:
    schema = model.model_json_schema(mode="serialization")
    components = document["components"]["schemas"]
    for name, definition in schema.pop("$defs", {}).items():
        assert components[name] == rewrite_refs(definition), name
    assert components[model.__name__] == rewrite_refs(schema)


def test_status_codes_and_security(document: dict[str, Any]) -> None:
    ops = {(method, path): op for path, method, op in operations(document)}
    codes = {key: set(op["responses"]) for key, op in ops.items()}
    assert codes[("post", "/train")] == {"200", "202", "400", "401", "403", "409", "413", "422", "503"}
    assert codes[("get", "/train")] == {"200", "401", "422", "503"}
    assert codes[("get", "/train/{job_id}")] == {"200", "401", "404", "503"}
    assert codes[("delete", "/train/{job_id}")] == {"202", "401", "404", "409", "503"}
    assert codes[("get", "/train/{job_id}/events")] == {"200", "401", "404", "503"}
    assert codes[("post", "/events/s3")] == {"200", "400", "401", "413", "422", "503"}
    assert codes[("head", "/events/s3")] == {"200"}
    assert codes[("get", "/readyz")] == {"200", "503"}
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for (method, path), op in ops.items():
        if path.startswith("/train"):
            assert op["security"] == [{"apiToken": []}], (method, path)
        elif (method, path) == ("post", "/events/s3"):
            assert op["security"] == [{"webhookToken": []}]
        else:
            assert op["security"] == [], (method, path)
        if op["security"]:
            assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
        for code, response in op["responses"].items():
            if int(code) >= 400 and path != "/readyz":
                assert response["content"]["application/json"]["schema"] == error_ref, (method, path, code)
            if code == "503" and path != "/readyz":
                assert response["headers"]["Retry-After"]["required"] is True, (method, path)
    schemes = document["components"]["securitySchemes"]
    assert schemes == {name: {"type": "http", "scheme": "bearer", "description": schemes[name]["description"]}
                       for name in ("apiToken", "webhookToken")}


def test_list_parameters_and_job_id(document: dict[str, Any]) -> None:
    params = {p["name"]: p for p in document["paths"]["/train"]["get"]["parameters"]}
    assert set(params) == {"limit", "cursor", "status"} and all(p["in"] == "query" for p in params.values())
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}
    assert params["status"]["schema"]["enum"] == [state.value for state in JobState]
    for path in ("/train/{job_id}", "/train/{job_id}/events"):
        (job_id,) = document["paths"][path]["parameters"]
        assert job_id["name"] == "job_id" and job_id["in"] == "path" and job_id["required"] is True
    # POST /train reads its idempotency key from the body, not from a header; its one header
    # parameter is the optional trace context, which the answers return.
    post = document["paths"]["/train"]["post"]
    assert [(p["name"], p["in"], p["required"]) for p in post["parameters"]] == [("traceparent", "header", False)]
    assert {code: "traceparent" in post["responses"][code]["headers"] for code in ("200", "202")} == {
        "200": True, "202": True}


def test_sse_events_are_described_by_their_models(document: dict[str, Any]) -> None:
    stream = document["paths"]["/train/{job_id}/events"]["get"]["responses"]["200"]["content"]
    events = {e["properties"]["event"]["const"]: e for e in stream["text/event-stream"]["schema"]["oneOf"]}
    assert {name: e["properties"]["data"]["contentSchema"] for name, e in events.items()} == {
        "view": {"$ref": "#/components/schemas/JobView"},
        "status": {"$ref": "#/components/schemas/StatusEvent"},
        "end": {"$ref": "#/components/schemas/SseEnd"},
    }


def test_one_schema_per_name_or_a_loud_error() -> None:
    from ingress.openapi import _Schemas

    class JobView(BaseModel):  # same name as the real one, another shape
        other: int

    schemas = _Schemas()
    schemas.ref(JobList)  # brings in the real JobView
    with pytest.raises(ValueError, match="JobView"):
        schemas.ref(JobView)


# --- serving it ---------------------------------------------------------------------------------
async def test_docs_and_openapi_are_open_and_train_needs_the_token(client: TestClient) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.json() == build_openapi()

    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert 'href="openapi.json"' in page
    for path in build_openapi()["paths"]:
        assert re.sub(r"[{}]", "", path) in re.sub(r"[{}]", "", page), path
    # Self-contained: nothing loaded from elsewhere (deployments may have no internet).
    assert "<script" not in page and "http://" not in page and "https://" not in page

    assert (await client.get("/train")).status == 401
    assert (await client.get("/train", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/train", headers={"Authorization": f"Bearer {API_TOKEN}"})).status == 200
    assert (await client.post("/events/s3", json={})).status == 401
    assert (await client.head("/events/s3")).status == 200


async def test_the_document_is_built_once_per_app(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(version: str | None = None) -> dict[str, Any]:
        calls.append(version)
        return build_openapi(version)

    monkeypatch.setattr(ingress.routes_docs, "build_openapi", counting)
    first = await (await client.get("/openapi.json")).read()
    await client.get("/docs")
    assert await (await client.get("/openapi.json")).read() == first
    assert len(calls) == 1
    # A second app builds its own.
    docs = ingress.routes_docs.ApiDocs(version="9.9.9")
    resp = await docs.openapi_json(None)  # type: ignore[arg-type] - the handler reads nothing from it
    assert isinstance(resp, web.Response) and isinstance(resp.body, bytes)
    assert json.loads(resp.body)["info"]["version"] == "9.9.9"
    assert len(calls) == 2


# --- the document's promises at their edges (problems the fuzzing found, and cases it cannot generate) ---
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


async def test_every_get_answers_head_without_a_body(client: TestClient) -> None:
    """HEAD of a live event stream too: its frames once went out on the HEAD answer, so the next
    answer on that connection never came, and the stream held its subscription."""
    job_id = (await (await client.post("/train", json={"dataset_uri": "s3://lake/datasets/x/"}, headers=AUTH)).json())[
        "job_id"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:  # one connection
        for path, method, _ in operations(build_openapi()):
            if method != "get":
                continue
            url = str(client.make_url(path.replace("{job_id}", job_id)))
            async with asyncio.timeout(5):
                head = await http.head(url, headers=AUTH)
                assert head.status == 200, path
                assert head.content_type == ("text/event-stream" if path.endswith("/events") else
                                             "text/html" if path == "/docs" else
                                             "text/plain" if path == "/metrics" else "application/json"), path
                assert await head.read() == b"", path
                healthz = await http.get(str(client.make_url("/healthz")))  # the same connection, still sound
                assert healthz.status == 200 and await healthz.json() == {"status": "ok"}
        async with asyncio.timeout(5):
            assert (await http.head(str(client.make_url("/train/unknown-job/events")), headers=AUTH)).status == 404
    assert not client.server.app[DEPS].streams


@pytest.mark.parametrize(("query", "status", "field"), [
    ("status=", 422, "status"), ("limit=", 422, "limit"), ("status=RUNNING", 200, None), ("cursor=", 200, None),
])
async def test_list_query_as_documented(query: str, status: int, field: str | None, client: TestClient) -> None:
    """An empty status or limit is refused (it used to be read as no filter, against the
    document's enum); an empty cursor is the first page, as documented."""
    resp = await client.get(f"/train?{query}", headers=AUTH)
    assert resp.status == status
    if field is not None:
        assert (await resp.json())["field"] == field


@pytest.mark.parametrize("raw", [
    b'{"dataset_uri": "s3://lake/datasets/x/", "config": {"weight_decay": Infinity}}',
    b'{"dataset_uri": "s3://lake/datasets/x/", "config": {"weight_decay": 1e400}}',
    b'{"dataset_uri": "s3://lake/datasets/x/", "config": {"lr": NaN}}',
    b"[" * 100_000,
])
async def test_bodies_that_are_not_json_are_400(raw: bytes, client: TestClient) -> None:
    """NaN, Infinity and a number beyond a float are not JSON: accepted, an infinite weight decay
    was stored as null and the job's view no longer read back (GET 500, GET /train 422). Deep
    nesting was a 500."""
    for path, headers in (("/train", AUTH), ("/events/s3", {"Authorization": f"Bearer {WEBHOOK_TOKEN}"})):
        resp = await client.post(path, data=raw, headers={**headers, "Content-Type": "application/json"})
        assert resp.status == 400, (path, await resp.text())
        assert (await resp.json())["error"]
    listed = await client.get("/train", headers=AUTH)
    assert listed.status == 200 and (await listed.json())["jobs"] == []


@pytest.mark.parametrize(("field", "value"), [("register_model", 0), ("register_model", "true"),
                                              ("deadline_s", "3600"), ("deadline_s", True)])
async def test_train_request_types_are_strict(field: str, value: Any, client: TestClient) -> None:
    """The document says boolean and integer: a 0 or a "3600" is refused, not coerced."""
    resp = await client.post("/train", json={"dataset_uri": "s3://lake/datasets/x/", field: value}, headers=AUTH)
    assert resp.status == 422 and (await resp.json())["field"] == field
