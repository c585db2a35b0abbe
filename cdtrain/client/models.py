"""What the client returns: the service's own response models, plus typed event-stream frames."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from ingress.models import Accepted, CancelAccepted, ErrorBody, FieldProblem, JobList
from schemas.events import StatusEvent
from schemas.jobs import JobState, JobView

__all__ = ["Accepted", "CancelAccepted", "EndFrame", "ErrorBody", "FieldProblem", "JobList", "JobView", "StatusEvent",
           "StatusFrame", "StreamFrame", "ViewFrame"]


class _Frame(BaseModel):
    model_config = ConfigDict(frozen=True)


class ViewFrame(_Frame):
    """``event: view``: the job's current view, always the first frame of a stream."""

    kind: Literal["view"] = "view"
    view: JobView


class StatusFrame(_Frame):
    """``event: status``: one status event newer than everything sent before on this stream."""

    kind: Literal["status"] = "status"
    event: StatusEvent


class EndFrame(_Frame):
    """``event: end``: the job reached a terminal state; the server closes the stream."""

    kind: Literal["end"] = "end"
    job_id: str
    state: JobState


StreamFrame = ViewFrame | StatusFrame | EndFrame
