"""Following one job to its end over the event stream, reconnecting when the stream drops.

The client keeps its own copy of the view and advances it with each status event, by the
projector's rules (infra/views/merge.py), so the final summary does not wait for the projector.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from cdtrain.client.api import ApiClient
from cdtrain.client.errors import ApiError, ServiceUnavailable, ServiceUnreachable, StreamInterrupted
from cdtrain.client.models import EndFrame, JobView, StatusEvent, StatusFrame, ViewFrame
from schemas.events import STICKY_FIELDS
from schemas.jobs import EpochMetrics, JobPhase, JobState

OnUpdate = Callable[[JobView, StatusEvent | None], None]
"""Called with the new view, and the event that made it (None when a whole view arrived)."""

_RETRYABLE = (StreamInterrupted, ServiceUnreachable, ServiceUnavailable)


async def follow(api: ApiClient, job_id: str, on_update: OnUpdate,
                 on_notice: Callable[[str], None] = lambda _: None) -> JobView:
    """Report every change of the job until it is terminal, and return its final view.

    A stream that ends or breaks before the job does is reconnected after ``reconnect_delay_s``,
    re-reading the view first; failing to reconnect for ``reconnect_give_up_s`` raises the last
    error. Errors before the first frame (unreachable, 404, 503, 401) are raised at once.
    """
    settings = api.settings
    view: JobView | None = None
    trouble_since: float | None = None
    while True:
        try:
            if view is not None:  # a reconnect: the view may have moved on while we were away
                view = _newer(view, await api.get(job_id), on_update)
                if view.state.is_terminal:
                    return view
            async with contextlib.aclosing(api.events(job_id)) as frames:
                async for frame in frames:
                    trouble_since = None
                    if isinstance(frame, ViewFrame):
                        view = _newer(view, frame.view, on_update)
                    elif isinstance(frame, StatusFrame) and view is not None:
                        if frame.event.sequence > view.last_sequence:
                            view = advance(view, frame.event)
                            on_update(view, frame.event)
                    elif isinstance(frame, EndFrame) and view is not None:
                        return view if view.state.is_terminal else view.model_copy(update={"state": frame.state})
            problem: ApiError = StreamInterrupted("the service closed the event stream before the job ended")
        except _RETRYABLE as exc:
            if view is None:
                raise
            problem = exc
        trouble_since = trouble_since or time.monotonic()
        if time.monotonic() - trouble_since >= settings.reconnect_give_up_s:
            raise problem
        on_notice(f"{problem}; reconnecting in {settings.reconnect_delay_s:g} s")
        await asyncio.sleep(settings.reconnect_delay_s)


def _newer(current: JobView | None, fresh: JobView, on_update: OnUpdate) -> JobView:
    if current is not None and fresh.last_sequence <= current.last_sequence:
        return current
    on_update(fresh, None)
    return fresh


def advance(view: JobView, event: StatusEvent) -> JobView:
    """The view after a newer ``event``: the projector's rules, applied to the client's copy."""
    data = event.data
    update: dict[str, object] = {
        "state": data.state, "phase": data.phase, "updated_at": event.time, "last_sequence": data.sequence,
        "error": data.error if data.state in (JobState.FAILED, JobState.CANCELLED) else None,
    }
    update.update({name: getattr(data, name) for name in STICKY_FIELDS if getattr(data, name) is not None})
    if data.metrics is not None:
        update["metrics"] = dict(data.metrics)
        if data.state is JobState.SUCCEEDED:
            update["best_metrics"] = dict(data.metrics)
    if (data.state is JobState.RUNNING and data.epoch is not None and data.metrics is not None
            and data.phase in (None, JobPhase.TRAINING)):
        entry = EpochMetrics(epoch=data.epoch, metrics=dict(data.metrics), time=event.time)
        update["history"] = sorted([h for h in view.history if h.epoch != data.epoch] + [entry],
                                   key=lambda h: h.epoch)
    if view.request is None and data.request is not None:
        update.update(request=data.request, source=data.source, trigger=data.trigger,
                      model_name=data.request.model_name, submitted_at=data.submitted_at or view.submitted_at)
    return view.model_copy(update=update)
