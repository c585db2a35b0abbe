"""``ApiClient``: the HTTP API of docs/api.md as async methods returning pydantic models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError

from cdtrain.client.errors import (
    ApiError,
    Conflict,
    JobEnded,
    JobNotFound,
    RequestRejected,
    ServiceUnavailable,
    ServiceUnreachable,
    StreamInterrupted,
    Unauthorized,
    UnexpectedResponse,
)
from cdtrain.client.models import (
    Accepted,
    CancelAccepted,
    EndFrame,
    ErrorBody,
    JobList,
    JobView,
    StatusFrame,
    StreamFrame,
    ViewFrame,
)
from cdtrain.client.settings import ClientSettings
from cdtrain.client.sse import SseMessage, SseParser
from schemas.events import StatusEvent

_READ_CHUNK = 1 << 16


class ApiClient:
    """One connection pool to one service. Use ``async with ApiClient(settings) as api``."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "ApiClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the API ------------------------------------------------------------------------------
    async def submit(self, dataset_uri: str, *, config_uri: str | None = None,
                     config: Mapping[str, Any] | None = None, register_model: bool = False,
                     model_name: str | None = None, idempotency_key: str | None = None) -> Accepted:
        """POST /train. ``Accepted.duplicate`` is true when the idempotency key named an existing job.

        The body is validated by the service, not here, so its 422 names the bad field.
        """
        body: dict[str, Any] = {"dataset_uri": dataset_uri, "config_uri": config_uri,
                                "config": dict(config) if config else None, "model_name": model_name,
                                "idempotency_key": idempotency_key}
        body = {k: v for k, v in body.items() if v is not None}
        if register_model:
            body["register_model"] = True
        return Accepted.model_validate(await self._json("POST", "/train", json=body))

    async def get(self, job_id: str) -> JobView:
        """GET /train/{job_id}; :class:`JobNotFound` when there is no such job."""
        return JobView.model_validate(await self._json("GET", _job_path(job_id), job_id=job_id))

    async def cancel(self, job_id: str) -> CancelAccepted:
        """DELETE /train/{job_id}: :class:`JobNotFound`, or :class:`JobEnded` when it already ended."""
        return CancelAccepted.model_validate(await self._json("DELETE", _job_path(job_id), job_id=job_id))

    async def list(self, *, status: str | None = None, limit: int | None = None,
                   cursor: str | None = None) -> JobList:
        """GET /train: newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
        params = {k: str(v) for k, v in (("status", status), ("limit", limit), ("cursor", cursor)) if v is not None}
        return JobList.model_validate(await self._json("GET", "/train", params=params))

    async def events(self, job_id: str) -> AsyncIterator[StreamFrame]:
        """GET /train/{job_id}/events: the view first, then newer status events, then ``end``.

        Returns without an :class:`EndFrame` if the server closes the stream early (it does on
        shutdown); raises :class:`StreamInterrupted` if the connection breaks or goes silent for
        ``stream_idle_timeout_s``. Unknown event names are skipped.
        """
        timeout = aiohttp.ClientTimeout(total=None, connect=self.settings.connect_timeout_s,
                                        sock_read=self.settings.stream_idle_timeout_s)
        with self._transport_errors():
            response = await self._http().get(self._url(_job_path(job_id) + "/events"), timeout=timeout,
                                              headers={"Accept": "text/event-stream"})
        async with response:
            if response.status != 200:
                await self._raise_for(response, job_id)
            parser = SseParser()
            while True:
                try:
                    chunk = await response.content.readany()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    raise StreamInterrupted(f"the event stream of job {job_id} broke off: "
                                            f"{_describe(exc, self.settings.stream_idle_timeout_s)}") from exc
                if not chunk:
                    return
                for message in parser.feed(chunk):
                    frame = _frame(message)
                    if frame is not None:
                        yield frame

    # --- plumbing -----------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Accept": "application/json"}
            if self.settings.token is not None:
                headers["Authorization"] = f"Bearer {self.settings.token.get_secret_value()}"
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(
                total=self.settings.request_timeout_s, connect=self.settings.connect_timeout_s))
        return self._session

    def _url(self, path: str) -> str:
        return self.settings.url + path

    async def _json(self, method: str, path: str, *, json: Any = None, params: Mapping[str, str] | None = None,
                    job_id: str | None = None) -> Any:
        with self._transport_errors():
            async with self._http().request(method, self._url(path), json=json, params=params) as response:
                if response.status >= 300:
                    await self._raise_for(response, job_id)
                try:
                    return await response.json(content_type=None)
                except ValueError:
                    raise UnexpectedResponse(f"{method} {path}: the answer is not JSON "
                                             f"(is {self.settings.url} a cdtrain service?)",
                                             status=response.status) from None

    @contextlib.contextmanager
    def _transport_errors(self) -> Iterator[None]:
        try:
            yield
        except ApiError:
            raise
        except aiohttp.ClientConnectorError as exc:
            raise ServiceUnreachable(f"cannot reach the cdtrain service at {self.settings.url}: "
                                     f"{_connect_reason(exc)} (is `cdtrain serve` running?)") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ServiceUnreachable(f"no answer from the cdtrain service at {self.settings.url}: "
                                     f"{_describe(exc, self.settings.request_timeout_s)}") from exc

    async def _raise_for(self, response: aiohttp.ClientResponse, job_id: str | None) -> None:
        status = response.status
        raw = await response.read()
        try:
            body: ErrorBody | None = ErrorBody.model_validate_json(raw)
        except ValidationError:
            body = None
        message = body.error if body else (raw.decode("utf-8", "replace").strip()[:200] or response.reason or "")
        if status in (400, 422):
            raise RequestRejected(message, status=status, field=body.field if body else None,
                                  details=list(body.details or []) if body else [])
        if status == 401:
            raise Unauthorized(f"the service at {self.settings.url} refused the request: {message} "
                               "(set CDTRAIN_API_TOKEN)", status=401)
        if status == 404 and job_id is not None and body is not None and "not found" in body.error:
            raise JobNotFound(job_id)
        if status == 409 and body is not None and body.state is not None:
            raise JobEnded(message, job_id=body.job_id, state=body.state)
        if status == 409:
            raise Conflict(message, job_id=body.job_id if body else None)
        if status == 503:
            retry_after = _retry_after(response.headers.get("Retry-After"), body)
            raise ServiceUnavailable(message, retry_after=retry_after)
        raise UnexpectedResponse(f"{response.method} {response.url.path}: HTTP {status}: {message}", status=status)


def _job_path(job_id: str) -> str:
    return "/train/" + quote(job_id, safe="")


def _frame(message: SseMessage) -> StreamFrame | None:
    try:
        if message.event == "view":
            return ViewFrame(view=JobView.model_validate_json(message.data))
        if message.event == "status":
            return StatusFrame(event=StatusEvent.model_validate_json(message.data))
        if message.event == "end":
            return EndFrame.model_validate(json.loads(message.data))
    except (ValidationError, ValueError) as exc:
        raise UnexpectedResponse(f"unreadable {message.event!r} event on the stream: {exc}") from exc
    return None


def _retry_after(header: str | None, body: ErrorBody | None) -> float | None:
    if header and header.strip().isdigit():
        return float(header)
    return float(body.retry_after) if body and body.retry_after is not None else None


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    if os_error.errno:
        return os.strerror(os_error.errno)
    return str(os_error) or type(os_error).__name__


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"nothing received for {timeout_s:g} s"
    return str(exc) or type(exc).__name__
