"""POST /train, DELETE /train/{job_id}, GET /train, GET /train/{job_id}: commands in, queries out of
the job views."""

from __future__ import annotations

import re

from aiohttp import web

from infra.views.merge import InvalidCursor
from ingress.deps import DEPS
from ingress.errors import RequestInvalid
from ingress.http import error_response, json_response
from ingress.cancel import cancel_message
from ingress.models import Accepted, CancelAccepted, FieldProblem, JobList
from ingress.validation import parse_list_query, parse_train_request
from schemas.jobs import JOB_ID_PATTERN
from schemas.tracing import TRACEPARENT_HEADER, continue_trace

_JOB_ID = re.compile(JOB_ID_PATTERN)


def status_url(job_id: str) -> str:
    return f"/train/{job_id}"


async def post_train(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    train_request = parse_train_request(await request.read())
    # This request is a span of the caller's trace (a new trace without a valid header); the job's
    # events continue it, and the answer names it so the caller can find them.
    trace = str(continue_trace(request.headers.get(TRACEPARENT_HEADER)))
    sub = await deps.submitter.submit(train_request, source="api", traceparent=trace)
    url = status_url(sub.job_id)
    body = Accepted(job_id=sub.job_id, status_url=url, state=sub.state.name, duplicate=not sub.created)
    headers = {"Location": url}
    if sub.traceparent is not None:  # a duplicate answers with its job's trace
        headers[TRACEPARENT_HEADER] = sub.traceparent
    # 202 only now: the request is confirmed by the broker (Submitter raises otherwise).
    return json_response(body, status=202 if sub.created else 200, headers=headers)


async def delete_job(request: web.Request) -> web.Response:
    """Cancel a job: 202 once the request is recorded (ingress/cancel.py), 404, or 409 if it ended."""
    deps = request.app[DEPS]
    job_id = request.match_info["job_id"]
    outcome = await deps.canceller.cancel(job_id) if _JOB_ID.fullmatch(job_id) else None
    if outcome is None:
        return error_response(404, f"job {job_id} not found")
    view = outcome.view
    body = CancelAccepted(job_id=job_id, status_url=status_url(job_id), state=view.state.name,
                          cancel_requested_at=view.cancel_requested_at, message=cancel_message(outcome))
    return json_response(body, status=202, headers={"Location": status_url(job_id)})


async def get_job(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    job_id = request.match_info["job_id"]
    view = await deps.views.call(deps.views.store.get(job_id)) if _JOB_ID.fullmatch(job_id) else None
    if view is None:
        return error_response(404, f"job {job_id} not found")
    return json_response(view)


async def list_jobs(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    query = parse_list_query(dict(request.query), deps.settings.list_default_limit)
    try:
        jobs, next_cursor = await deps.views.call(
            deps.views.store.list(limit=query.limit, cursor=query.cursor, state=query.status))
    except InvalidCursor as exc:  # limit and status were checked above; anything else is ours (500)
        raise RequestInvalid("query", [FieldProblem(field="cursor", message=str(exc), type="value_error")]) from None
    return json_response(JobList(jobs=jobs, next_cursor=next_cursor))
