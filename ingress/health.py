"""/healthz (the process answers) and /readyz (it can accept jobs: bus and view store up)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from aiohttp import web

from ingress.deps import DEPS
from ingress.http import bearer_ok, json_response
from ingress.models import Readiness

_PROBE_JOB_ID = "readyz-probe"


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    timeout = deps.settings.store_timeout_s
    # request_backlog is a broker round trip on the publishing connection: it fails while
    # that connection is down or reconnecting, which is exactly when a POST would get 503.
    names = ("bus", "view_store")
    outcomes = await asyncio.gather(
        _probe(deps.bus.request_backlog(), timeout),
        _probe(deps.views.store.get(_PROBE_JOB_ID), timeout),
    )
    checks = dict(zip(names, outcomes))
    if not bearer_ok(request, deps.settings.enforced_api_token):
        # Driver errors name hosts, ports and users: only callers with the API token see them.
        checks = {name: "ok" if state == "ok" else "down" for name, state in checks.items()}
    down = [f"{name}: {state.removeprefix('down: ')}" for name, state in checks.items() if state != "ok"]
    if down:
        body = Readiness(status="unavailable", checks=checks, error="not ready: " + "; ".join(down))
        return json_response(body, status=503)
    return json_response(Readiness(status="ready", checks=checks))


async def _probe(awaitable: Awaitable[object], timeout: float) -> str:
    try:
        async with asyncio.timeout(timeout):
            await awaitable
    except TimeoutError:
        return f"down: no answer within {timeout:g} s"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; say which
        return f"down: {type(exc).__name__}: {exc}"
    return "ok"
