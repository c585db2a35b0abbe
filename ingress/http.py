"""HTTP plumbing shared by the routes: JSON bodies, the error mapping, bearer-token checks."""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, SecretStr

from ingress.errors import (
    IdempotencyConflict,
    LocationNotAllowed,
    MalformedBody,
    NothingToCancel,
    RequestInvalid,
    Unavailable,
)
from ingress.models import ErrorBody

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), status=status, headers=headers,
                        content_type="application/json")


def error_response(status: int, message: str, *, headers: dict[str, str] | None = None,
                   **extra: object) -> web.Response:
    body = ErrorBody(error=message, **extra)  # type: ignore[arg-type]
    return web.Response(body=body.model_dump_json(exclude_none=True).encode(), status=status,
                        headers=headers, content_type="application/json")


def unavailable_response(exc: Unavailable) -> web.Response:
    seconds = max(1, math.ceil(exc.retry_after))  # Retry-After takes whole seconds
    return error_response(503, f"{exc}; retry in {seconds} s", retry_after=seconds,
                          headers={"Retry-After": str(seconds)})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON ``{"error": ...}``, whichever layer raised it."""
    try:
        return await handler(request)
    except LocationNotAllowed as exc:
        return error_response(403, str(exc), field=exc.field, details=exc.details)
    except RequestInvalid as exc:
        return error_response(422, str(exc), field=exc.field, details=exc.details)
    except MalformedBody as exc:
        return error_response(400, str(exc))
    except IdempotencyConflict as exc:
        return error_response(409, str(exc), job_id=exc.job_id)
    except NothingToCancel as exc:
        return error_response(409, str(exc), job_id=exc.job_id, state=exc.state.name)
    except Unavailable as exc:
        log.warning("%s %s: %s", request.method, request.path, exc)
        return unavailable_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own 404/405/413 are plain text; keep their headers (Allow, ...).
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        message = exc.text or exc.reason
        if exc.status == 404:
            message = f"no such resource: {request.path}"
        elif exc.status == 413:
            message = f"request body too large: {message}"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path} (allowed: {headers.get('Allow', '')})"
        return error_response(exc.status, message, headers=headers)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error (logged by the ingress)")


def bearer_ok(request: web.Request, token: SecretStr | None) -> bool:
    if token is None:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time: the comparison must not reveal how much of a guess was right.
    return hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode())


def unauthorized(realm: str) -> web.Response:
    return error_response(401, f"missing or wrong bearer token for {realm}",
                          headers={"WWW-Authenticate": f'Bearer realm="{realm}"'})


def auth_middleware(api_token: SecretStr | None, webhook_token: SecretStr | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    """``/train*`` needs the API token, ``POST /events/s3`` the webhook token (when set).

    ``HEAD /events/s3`` stays open: MinIO probes the endpoint with it, and it reveals nothing.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path == "/train" or path.startswith("/train/"):
            if not bearer_ok(request, api_token):
                return unauthorized("cdtrain api")
        elif path == "/events/s3" and request.method != "HEAD":
            if not bearer_ok(request, webhook_token):
                return unauthorized("cdtrain bucket events")
        return await handler(request)

    return middleware
