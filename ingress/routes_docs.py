"""GET /openapi.json and GET /docs: the API's OpenAPI document and a page that reads it; GET
/asyncapi.json: the message bus's AsyncAPI document (schemas/asyncapi.py), for this ingress's
topology; GET /schemas/status-event-data.json: the JSON Schema that status events' ``dataschema``
names.

All are open (no token): they describe the API, not its data. The page is self-contained (no
script, no stylesheet from elsewhere), so it works where the ingress has no internet.
"""

from __future__ import annotations

import html
import json
from typing import Any

from aiohttp import web

from ingress.deps import DEPS
from ingress.openapi import build_openapi, package_version
from schemas.asyncapi import build_asyncapi
from schemas.events import status_data_json_schema

_METHODS = ("get", "head", "post", "put", "patch", "delete")
_STYLE = """body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#222}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:.35rem .5rem;text-align:left;vertical-align:top}
.m{font-weight:600;font-family:monospace;text-transform:uppercase}"""


class ApiDocs:
    """The two handlers, over one document built on the first request and kept for the app's life
    (it depends only on the code and the package version)."""

    def __init__(self, version: str | None = None) -> None:
        self._version = version
        self._json: bytes | None = None
        self._html: bytes | None = None
        self._asyncapi: bytes | None = None
        self._data_schema: bytes | None = None

    def _build(self) -> None:
        document = build_openapi(self._version)
        self._json = json.dumps(document, separators=(",", ":")).encode()
        self._html = render_page(document).encode()

    async def openapi_json(self, request: web.Request) -> web.Response:
        if self._json is None:
            self._build()
        return web.Response(body=self._json, content_type="application/json")

    async def docs_page(self, request: web.Request) -> web.Response:
        if self._html is None:
            self._build()
        return web.Response(body=self._html, content_type="text/html")

    async def asyncapi_json(self, request: web.Request) -> web.Response:
        if self._asyncapi is None:  # the app's topology is fixed for its life
            document = build_asyncapi(request.app[DEPS].bus.topology, version=self._version or package_version())
            self._asyncapi = json.dumps(document, separators=(",", ":")).encode()
        return web.Response(body=self._asyncapi, content_type="application/json")

    async def status_data_schema(self, request: web.Request) -> web.Response:
        if self._data_schema is None:
            self._data_schema = json.dumps(status_data_json_schema(), separators=(",", ":")).encode()
        return web.Response(body=self._data_schema, content_type="application/json")


def render_page(document: dict[str, Any]) -> str:
    """One table row per operation: method, path, summary, auth, status codes."""
    info = document["info"]
    rows = []
    for path, item in document["paths"].items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            security = operation.get("security") or []
            auth = ", ".join(name for requirement in security for name in requirement) or "open"
            codes = ", ".join(operation.get("responses", {}))
            rows.append(f"<tr><td class=m>{method}</td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(operation.get('summary', ''))}</td><td>{html.escape(auth)}</td>"
                        f"<td>{html.escape(codes)}</td></tr>")
    title = html.escape(f"{info['title']} {info['version']}")
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>{html.escape(info.get('description', ''))}</p>"
        "<p>The machine-readable description (OpenAPI 3.1): <a href=\"openapi.json\">/openapi.json</a>; "
        "the message bus (AsyncAPI 3.0): <a href=\"asyncapi.json\">/asyncapi.json</a>. "
        "Tokens are sent as <code>Authorization: Bearer &lt;token&gt;</code>.</p>"
        "<table><thead><tr><th>method</th><th>path</th><th>what</th><th>token</th><th>answers</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></body></html>"
    )
