"""GET /train/{job_id}/events: a job's status as Server-Sent Events.

Frames, in this order::

    retry: 3000
    event: view        id: <last_sequence>   data: <JobView JSON>     (always first)
    event: status      id: <sequence>        data: <StatusEvent JSON> (each newer event)
    : ping                                                            (every sse_heartbeat_s)
    event: end                               data: {"job_id", "state"} (then the stream closes)

The subscription to ``job.<id>.*`` is opened *before* the view is read, so an event published
in between is not missed; events the view already covers (sequence <= the view's) are
skipped. ``end`` is sent at a terminal state, so a client (EventSource reconnects on its own
when a stream just closes) knows to stop.
"""

from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import web

from infra.bus.base import Delivery
from infra.bus.errors import BusUnavailable
from ingress.deps import DEPS
from ingress.errors import Unavailable
from ingress.http import error_response
from ingress.models import SseEnd
from schemas.events import StatusEvent
from schemas.jobs import JOB_ID_PATTERN, JobState
from schemas.topology import job_binding_key

log = logging.getLogger(__name__)

_JOB_ID = re.compile(JOB_ID_PATTERN)
_RECONNECT_MS = 3000
_STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx would otherwise buffer the stream
}


def frame(data: str, *, event: str | None = None, event_id: str | int | None = None) -> bytes:
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    # A data field cannot hold a newline: each line of the payload gets its own field.
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


def end_frame(job_id: str, state: JobState) -> bytes:
    return frame(SseEnd(job_id=job_id, state=state).model_dump_json(), event="end")


async def stream_job_events(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    job_id = request.match_info["job_id"]
    if not _JOB_ID.fullmatch(job_id):  # fullmatch: "$" alone would let a trailing newline through
        return error_response(404, f"job {job_id} not found")
    if request.method == "HEAD":
        # No body on a HEAD answer: the frames written to it would corrupt the connection (the
        # next answer on it never arrives) and hold a subscription until the client left.
        if await deps.views.call(deps.views.store.get(job_id)) is None:
            return error_response(404, f"job {job_id} not found")
        return web.Response(headers=_STREAM_HEADERS)
    inbox: asyncio.Queue[StatusEvent | None] = asyncio.Queue()

    async def on_event(event: StatusEvent, delivery: Delivery) -> None:
        inbox.put_nowait(event)

    try:
        subscription = await deps.bus.subscribe_status(job_binding_key(job_id), on_event, model=StatusEvent)
    except BusUnavailable as exc:
        raise Unavailable("message bus", str(exc), retry_after=exc.retry_after) from exc
    deps.streams.add(inbox)
    try:
        view = await deps.views.call(deps.views.store.get(job_id))
        if view is None:
            return error_response(404, f"job {job_id} not found")
        response = web.StreamResponse(headers=_STREAM_HEADERS)
        await response.prepare(request)
        try:
            await response.write(f"retry: {_RECONNECT_MS}\n\n".encode())
            await response.write(frame(view.model_dump_json(), event="view", event_id=view.last_sequence))
            if view.state.is_terminal:
                await response.write(end_frame(job_id, view.state))
            else:
                await _relay(response, inbox, last_sequence=view.last_sequence,
                             heartbeat_s=deps.settings.sse_heartbeat_s)
        except ConnectionResetError:
            # The client went away (noticed at the latest on the next ping): nothing to answer.
            log.debug("SSE client of job %s went away", job_id)
        return response
    finally:
        deps.streams.discard(inbox)
        await subscription.close()


async def _relay(response: web.StreamResponse, inbox: asyncio.Queue[StatusEvent | None], *,
                 last_sequence: int, heartbeat_s: float) -> None:
    while True:
        try:
            event = await asyncio.wait_for(inbox.get(), heartbeat_s)
        except TimeoutError:
            await response.write(b": ping\n\n")  # raises once the client is gone
            continue
        if event is None:  # server shutting down; the client reconnects elsewhere
            return
        if event.sequence <= last_sequence:
            continue  # already in the view we sent, or a redelivered duplicate
        last_sequence = event.sequence
        await response.write(frame(event.model_dump_json(exclude_none=True), event="status",
                                   event_id=event.sequence))
        if event.state.is_terminal:
            await response.write(end_frame(event.job_id, event.state))
            return
