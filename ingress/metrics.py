"""The ingress's Prometheus metrics, served at ``GET /metrics`` on its HTTP port.

- ``cdtrain_http_requests_total`` and ``cdtrain_http_request_duration_seconds``: every answer,
  by route *template* (``/train/{job_id}``, never the path a client sent: one series per route,
  not per job), method and status. Paths no route matches are counted as ``unmatched``, methods
  outside the usual few as ``other``. An event stream's duration is the time it stayed open.
- ``cdtrain_jobs{state}``: jobs in each state, from the job views. Counted on scrape, at most
  once per ``states_ttl_s`` (one indexed count per state, bounded by the store timeout), so a
  tight scrape interval or several Prometheus servers cost the store nothing more.
- ``cdtrain_queue_messages{queue}``: messages waiting in the train-request queue (what the
  workers have not taken yet; KEDA scales on the same figure) and in the projector's queue.

A figure that cannot be read now (store or broker down, or too slow) is left out of that scrape
rather than shown stale, and ``cdtrain_metrics_source_errors_total{source}`` counts the misses.

``/metrics`` needs no token (docs/security.md): Prometheus scrapes without one, and nothing here
names a job, a dataset or a user.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from infra.metrics import PREFIX, render

if TYPE_CHECKING:
    from infra.bus.base import MessageBus
    from infra.views.store import JobViewStore

__all__ = ["IngressMetrics", "METRICS", "metrics_handler"]

log = logging.getLogger(__name__)

# Seconds; an API call is milliseconds, a list or a bucket event tens of them, a stream minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Refreshed:
    """An async reading shared by concurrent scrapes and kept ``ttl_s``; bounded by ``timeout_s``."""

    def __init__(self, read: Callable[[], Awaitable[Any]], *, ttl_s: float, timeout_s: float) -> None:
        self._read = read
        self.ttl_s, self.timeout_s = ttl_s, timeout_s
        self._value: Any = None
        self._at = -float("inf")
        self._lock = asyncio.Lock()

    async def get(self) -> Any:
        """The value, read again once older than ``ttl_s``; raises what the reading raised."""
        async with self._lock:  # one reading at a time: the others wait for it and share it
            if time.monotonic() - self._at >= self.ttl_s:
                async with asyncio.timeout(self.timeout_s):
                    self._value = await self._read()
                self._at = time.monotonic()
            return self._value


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry, *, view_store: JobViewStore, bus: MessageBus,
                 timeout_s: float = 5.0, states_ttl_s: float = 15.0, queues_ttl_s: float = 1.0) -> None:
        self.registry = registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered by the ingress",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram(f"{PREFIX}_http_request_duration_seconds",
                                 "Time from a request's arrival to the end of its answer",
                                 ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=registry)
        self.jobs = Gauge(f"{PREFIX}_jobs", "Jobs in each state, from the job views", ["state"], registry=registry)
        self.queue = Gauge(f"{PREFIX}_queue_messages", "Messages waiting in a queue (not being processed)",
                           ["queue"], registry=registry)
        self.source_errors = Counter(f"{PREFIX}_metrics_source_errors",
                                     "Scrapes that could not read a figure from its source", ["source"],
                                     registry=registry)
        self._states = _Refreshed(view_store.count_by_state, ttl_s=states_ttl_s, timeout_s=timeout_s)
        self._queues = _Refreshed(lambda: _queue_depths(bus), ttl_s=queues_ttl_s, timeout_s=timeout_s)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: it sees the status the client gets, after the error and auth middlewares."""
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away first (nginx's code for it)
            raise
        finally:
            labels = (route_template(request), request.method if request.method in _METHODS else "other",
                      str(status))
            self.requests.labels(*labels).inc()
            self.latency.labels(*labels).observe(time.perf_counter() - start)

    async def refresh(self) -> None:
        """Read the figures that live elsewhere (views, broker) into the gauges."""
        states, queues = await asyncio.gather(self._states.get(), self._queues.get(), return_exceptions=True)
        self._set(self.jobs, "view_store", states, key=lambda state: state.value)
        self._set(self.queue, "bus", queues, key=str)

    def _set(self, gauge: Gauge, source: str, values: Any, key: Callable[[Any], str]) -> None:
        if isinstance(values, BaseException):
            gauge.clear()
            self.source_errors.labels(source).inc()
            log.debug("metrics: %s not read: %s", source, values)
            return
        for name, value in values.items():
            gauge.labels(key(name)).set(value)


async def _queue_depths(bus: MessageBus) -> dict[str, int]:
    requests, projector = await asyncio.gather(bus.request_backlog(), bus.projector_backlog())
    return {"requests": requests, "projector": projector}


def route_template(request: web.Request) -> str:
    """The matched route's template (``/train/{job_id}``), never the path as sent."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


METRICS = web.AppKey("cdtrain_metrics", IngressMetrics)


async def metrics_handler(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    await metrics.refresh()
    body, content_type = render(metrics.registry, request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})
