"""``cdtrain serve --role ingress|consumer|projector|all``: the service's process roles.

``all`` runs every role in this process; with the embedded bus they share one in-process broker,
one view store and one object store. Heavy modules (torch, MLflow) load only for the roles that
need them, so an ingress starts in about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable

from cdtrain.settings import ServiceSettings
from infra.bus import InProcessBus, MemoryBroker, MessageBus, create_bus
from infra.views import open_view_store
from schemas.topology import Topology

log = logging.getLogger(__name__)

ROLES = ("ingress", "consumer", "projector")


async def serve(settings: ServiceSettings, roles: tuple[str, ...], stop: asyncio.Event,
                on_started: Callable[[list[str]], None] | None = None) -> None:
    ingress_settings = settings.ingress
    topology = Topology(prefix=ingress_settings.topology_prefix)
    broker = MemoryBroker(topology) if settings.embedded_bus else None

    def new_bus() -> MessageBus:
        if broker is not None:
            return InProcessBus(ingress_settings.bus, topology, broker=broker)
        return create_bus(ingress_settings.bus, topology)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        from ingress.main import open_object_store

        views = open_view_store(ingress_settings.view_store_url, database=ingress_settings.view_store_database)
        stack.push_async_callback(views.close)
        objects = open_object_store(ingress_settings)
        stack.push_async_callback(objects.close)

        async def connected_bus() -> MessageBus:
            bus = new_bus()
            await bus.connect()
            stack.push_async_callback(bus.close)
            return bus

        tasks = []
        if "projector" in roles:
            from consumer.roles import run_projector
            from consumer.watchdog import Watchdog

            bus = await connected_bus()
            watchdog = Watchdog(bus, views, stale_after=settings.stale_after, source=_source("watchdog"))
            tasks.append(run_projector(bus, views, watchdog, stop))
        if "consumer" in roles:
            tasks.append(_run_consumer(settings, await connected_bus(), objects, stop))
        if "ingress" in roles:
            from ingress.main import run_ingress

            bus = await connected_bus() if broker is not None else None  # RabbitMQ: run_ingress retries
            tasks.append(run_ingress(ingress_settings, stop=stop, on_started=on_started, bus=bus,
                                     view_store=views, object_store=objects,
                                     local_bucket_watch=ingress_settings.local_objects_dir is not None))
        elif on_started is not None:
            on_started([])
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result


async def _run_consumer(settings: ServiceSettings, bus: MessageBus, objects, stop: asyncio.Event) -> None:
    # The worker's imports (torch, MLflow) take seconds: only this role pays for them.
    from mlflow import MlflowClient

    from consumer.roles import run_worker
    from consumer.stores import StoreResolver
    from consumer.tracking.job_tracker import MlflowJobTracker
    from consumer.worker import TrainingWorker, WorkerSettings

    tracker = MlflowJobTracker(MlflowClient(tracking_uri=settings.mlflow_tracking_uri), settings.mlflow_experiment,
                               artifact_location=_artifact_location(settings))
    worker = TrainingWorker(
        bus, StoreResolver(objects, allow_local_paths=settings.allow_local_paths), tracker,
        WorkerSettings(work_dir=settings.data_dir / "worker", source=_source("worker"),
                       heartbeat_interval=settings.heartbeat_interval, config_overrides=settings.worker_config),
    )
    await run_worker(bus, worker, stop)


def _artifact_location(settings: ServiceSettings) -> str | None:
    # A local SQLite store would otherwise put artifacts in ./mlruns of whatever directory.
    if settings.mlflow_tracking_uri.startswith("sqlite:"):
        return (settings.data_dir / "mlartifacts").resolve().as_uri()
    return None


def _source(role: str) -> str:
    return f"/cdtrain/{role}/{socket.gethostname()}"


def main(role: str) -> int:
    settings = ServiceSettings.from_env(os.environ)
    logging.basicConfig(level=settings.ingress.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    roles = ROLES if role == "all" else (role,)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, roles, stop)

    asyncio.run(run())
    return 0
