"""The ingress web application, built from injected parts (nothing here connects to anything).

    app = create_app(settings, bus, view_store, object_store)

The caller owns the bus and the stores (connects and closes them); :mod:`ingress.main` is the
process wiring. This module imports no torch and no ``snunet_cbam`` (the edge must start in
about a second on a small CPU machine), and no S3/Mongo/AMQP client library either: those
come in through the injected objects.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from infra.metrics import new_registry
from ingress.bucket_events import BucketEventHandler
from ingress.cancel import Canceller
from ingress.deps import DEPS, Deps
from ingress.health import healthz, readyz
from ingress.http import auth_middleware, error_middleware
from ingress.metrics import METRICS, IngressMetrics, metrics_handler
from ingress.routes_events import head_events, post_events
from ingress.routes_docs import ApiDocs
from ingress.routes_train import delete_job, get_job, list_jobs, post_train
from ingress.sse import stream_job_events
from ingress.submit import Submitter, ViewReader
from schemas.events import STATUS_DATA_SCHEMA_PATH, event_source

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from infra.bus.base import MessageBus
    from infra.objects.store import ObjectStore
    from infra.views.store import JobViewStore
    from ingress.settings import IngressSettings

__all__ = ["BUCKET_EVENTS", "DEPS", "create_app"]

BUCKET_EVENTS = web.AppKey("cdtrain_bucket_events", BucketEventHandler)
"""The app's bucket-event handler, for listeners (AMQP, SQS) that run beside the HTTP routes."""


def create_app(settings: IngressSettings, bus: MessageBus, view_store: JobViewStore,
               object_store: ObjectStore, *, registry: CollectorRegistry | None = None) -> web.Application:
    """``registry``: where the ingress's metrics go (a process shares one among its roles); a
    registry of this app's own when not given."""
    views = ViewReader(view_store, timeout_s=settings.store_timeout_s, retry_after_s=settings.retry_after_s)
    submitter = Submitter(bus, views, event_source=event_source("ingress", settings.instance),
                          allowed=settings.allowed_uris)
    bucket_events = BucketEventHandler(settings.trigger, object_store, submitter,
                                       retry_after_s=settings.retry_after_s)
    deps = Deps(settings=settings, bus=bus, views=views, submitter=submitter, bucket_events=bucket_events,
                canceller=Canceller(bus, views))

    metrics = IngressMetrics(registry if registry is not None else new_registry(), view_store=view_store, bus=bus,
                             timeout_s=settings.store_timeout_s)
    # Metrics outermost, to count the status the client gets; then error_middleware: a 401 or
    # anything raised further in still leaves as JSON.
    app = web.Application(
        middlewares=[metrics.middleware, error_middleware,
                     auth_middleware(settings.enforced_api_token, settings.enforced_webhook_token)],
        client_max_size=settings.client_max_size,
    )
    app[DEPS] = deps
    app[BUCKET_EVENTS] = bucket_events
    app[METRICS] = metrics
    app.router.add_post("/train", post_train)
    app.router.add_get("/train", list_jobs)
    app.router.add_get("/train/{job_id}", get_job)
    app.router.add_delete("/train/{job_id}", delete_job)
    app.router.add_get("/train/{job_id}/events", stream_job_events)
    app.router.add_route("HEAD", "/events/s3", head_events)
    app.router.add_post("/events/s3", post_events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)  # open, like the probes (docs/security.md)
    docs = ApiDocs()  # open, like the probes: it describes the API, not its data
    app.router.add_get("/openapi.json", docs.openapi_json)
    app.router.add_get("/docs", docs.docs_page)
    app.router.add_get("/asyncapi.json", docs.asyncapi_json)
    app.router.add_get(STATUS_DATA_SCHEMA_PATH, docs.status_data_schema)
    app.on_shutdown.append(_end_streams)
    app.on_cleanup.append(_close_submitter)
    return app


async def _end_streams(app: web.Application) -> None:
    # Open SSE streams would otherwise keep a graceful shutdown waiting for its full timeout.
    for inbox in list(app[DEPS].streams):
        inbox.put_nowait(None)
    await asyncio.sleep(0)


async def _close_submitter(app: web.Application) -> None:
    await app[DEPS].submitter.close()
