"""``cdtrain serve --role ingress|consumer|projector|all``: the service's process roles.

``all`` runs every role in this process; with the embedded bus they share one in-process broker,
one view store and one object store. Heavy modules (torch, MLflow) load only for the roles that
need them, so an ingress starts in about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from cdtrain.settings import ServiceSettings
from infra.bus import BusUnavailable, InProcessBus, MemoryBroker, MessageBus, create_bus
from infra.views import open_view_store
from infra.logs import configure_logging, set_log_context
from infra.metrics import MetricsServer, new_registry
from schemas.topology import Topology

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

ROLES = ("ingress", "consumer", "projector")


async def serve(settings: ServiceSettings, roles: tuple[str, ...], stop: asyncio.Event,
                on_started: Callable[[list[str]], None] | None = None,
                broker: MemoryBroker | None = None, registry: CollectorRegistry | None = None) -> None:
    """Run ``roles`` until ``stop`` is set. ``broker``: the embedded bus's broker, to share it
    with callers that want to watch it (tests, embedding applications). ``registry``: the
    process's metrics (one for all its roles), served by the ingress at ``/metrics`` and, for the
    worker and projector roles, on ``settings.metrics_port``."""
    ingress_settings = settings.ingress
    topology = Topology(prefix=ingress_settings.topology_prefix)
    if settings.embedded_bus and broker is None:
        broker = MemoryBroker(topology)

    def new_bus() -> MessageBus:
        if broker is not None:
            return InProcessBus(ingress_settings.bus, topology, broker=broker)
        return create_bus(ingress_settings.bus, topology)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    registry = registry if registry is not None else new_registry()
    async with contextlib.AsyncExitStack() as stack:
        if settings.metrics_port and {"consumer", "projector"} & set(roles):
            # The ingress's listen address: loopback on a laptop, all interfaces in the images.
            metrics_server = MetricsServer(registry, settings.metrics_port, host=ingress_settings.host)
            if metrics_server.start():
                # Its shutdown waits for the server thread's poll: not on the event loop.
                stack.push_async_callback(asyncio.to_thread, metrics_server.close)
        from ingress.main import open_object_store

        views = open_view_store(ingress_settings.view_store_url, database=ingress_settings.view_store_database)
        stack.push_async_callback(views.close)
        objects = open_object_store(ingress_settings)
        stack.push_async_callback(objects.close)

        async def connected_bus() -> MessageBus:
            bus = new_bus()
            stack.push_async_callback(bus.close)
            await _connect_with_retry(bus, attempts=settings.connect_attempts)
            return bus

        # The ingress starts first: the consumer's heavy imports would otherwise compete with
        # its broker handshake.
        ingress_up = asyncio.Event()

        def started(urls: list[str]) -> None:
            ingress_up.set()
            if on_started is not None:
                on_started(urls)

        tasks = []
        # Each role's task, and the bus connection it uses, log with its role (infra/logs.py):
        # a task keeps the context it was created in.
        if "ingress" in roles:
            from ingress.main import run_ingress

            set_log_context(role="ingress")
            bus = await connected_bus() if broker is not None else None  # RabbitMQ: run_ingress retries
            tasks.append(asyncio.create_task(run_ingress(
                ingress_settings, stop=stop, on_started=started, bus=bus, view_store=views, object_store=objects,
                local_bucket_watch=ingress_settings.local_objects_dir is not None, registry=registry)))
            await asyncio.wait([tasks[0], asyncio.create_task(ingress_up.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
        else:
            started([])
        if "projector" in roles:
            from consumer.metrics import ProjectorMetrics
            from consumer.roles import run_projector
            from consumer.watchdog import Watchdog

            set_log_context(role="projector")
            bus = await connected_bus()
            watchdog = Watchdog(bus, views, stale_after=settings.stale_after, step_stall=settings.step_stall,
                                job_deadline=settings.job_deadline, accept_grace=settings.accept_grace,
                                volatile_queue=broker is not None,
                                source=_source("watchdog"))
            tasks.append(asyncio.create_task(run_projector(bus, views, watchdog, stop,
                                                           sweep_interval=settings.watchdog_interval,
                                                           dead_letter_source=_source("dead-letters"),
                                                           prefetch=settings.projector_prefetch,
                                                           metrics=ProjectorMetrics(registry))))
        if "consumer" in roles:
            set_log_context(role="consumer")
            if "ingress" not in roles and not ingress_settings.view_store_url.startswith("mongodb"):
                # The worker claims jobs in, and reads cancel requests from, the views the ingress
                # and the projector share; a file of this process is not those.
                log.warning("CDTRAIN_MONGODB_URL is not set: this worker cannot see jobs cancelled while queued, "
                            "nor tell that another worker holds a job")
            if ingress_settings.allowed_uris is None and not settings.embedded_bus:
                log.warning("CDTRAIN_ALLOWED_URIS is not set: this worker reads any dataset its credentials can "
                            "read, whoever queued the job")
            if not settings.checkpoints_at.startswith("s3://") and not settings.embedded_bus:
                log.warning("CDTRAIN_CHECKPOINT_URI is not s3://: checkpoints stay on this machine (%s), and a job "
                            "resumes only here", settings.checkpoints_at)
            tasks.append(asyncio.create_task(_run_consumer(settings, await connected_bus(), objects, views, stop,
                                                           registry)))
        set_log_context(role=None)  # this task's own lines: the process's role again
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result


async def _connect_with_retry(bus: MessageBus, attempts: int, delay: float = 2.0) -> None:
    """A broker that is restarting (or a loop briefly busy loading a client library) is not a
    reason to exit: retry for a while, then give up with the broker's error."""
    for attempt in range(1, attempts + 1):
        try:
            await bus.connect()
            return
        except BusUnavailable as exc:
            if attempt == attempts:
                raise
            log.warning("bus not reachable (%s); retry %d/%d in %.0f s", exc, attempt, attempts - 1, delay)
            await asyncio.sleep(delay)


async def _run_consumer(settings: ServiceSettings, bus: MessageBus, objects, views, stop: asyncio.Event,
                        registry: CollectorRegistry) -> None:
    # The worker's imports (torch, MLflow) take seconds: only this role pays for them, in a
    # thread, so an ingress in the same process answers meanwhile.
    await asyncio.to_thread(importlib.import_module, "consumer.tracking.job_tracker")
    from mlflow import MlflowClient

    from consumer.checkpoints import CheckpointStore
    from consumer.metrics import WorkerMetrics
    from consumer.roles import run_worker
    from consumer.stores import StoreResolver
    from consumer.tracking.job_tracker import MlflowJobTracker
    from consumer.worker import TrainingWorker, WorkerSettings

    def open_tracker() -> MlflowJobTracker:
        # Opening a SQLite store runs its migrations (seconds): never on the event loop, which
        # must keep answering the broker.
        tracker = MlflowJobTracker(MlflowClient(tracking_uri=settings.mlflow_tracking_uri),
                                   settings.mlflow_experiment, artifact_location=_artifact_location(settings),
                                   promotion_margin=settings.promotion_margin)
        tracker.ensure_experiment()
        return tracker

    tracker = await asyncio.to_thread(open_tracker)
    checkpoints = CheckpointStore.at(settings.checkpoints_at, objects)
    await checkpoints.check()
    log.info("checkpoints go to %s", settings.checkpoints_at)
    worker = TrainingWorker(
        bus, StoreResolver(objects, allow_local_paths=settings.allow_local_paths,
                           allowed=settings.ingress.allowed_uris), tracker,
        WorkerSettings(work_dir=settings.data_dir / "worker", source=_source("worker"),
                       heartbeat_interval=settings.heartbeat_interval, checkpoint_every_s=settings.checkpoint_every_s,
                       config_overrides=settings.worker_config, limits=settings.limits,
                       # Unsent status events survive a restart here; one outbox per worker process.
                       outbox_path=settings.data_dir / "worker" / "status-outbox.sqlite3"),
        # Claims (one owner per job) and cancel requests the ingress recorded.
        views=views, checkpoints=checkpoints, metrics=WorkerMetrics(registry),
    )
    await run_worker(bus, worker, stop, max_jobs=settings.worker_max_jobs, idle_exit_s=settings.worker_idle_exit)


def _artifact_location(settings: ServiceSettings) -> str | None:
    # A local SQLite store would otherwise put artifacts in ./mlruns of whatever directory.
    if settings.mlflow_tracking_uri.startswith("sqlite:"):
        return (settings.data_dir / "mlartifacts").resolve().as_uri()
    return None


def _source(role: str) -> str:
    return f"/cdtrain/{role}/{socket.gethostname()}"


def main(role: str, max_jobs: int | None = None, idle_exit_s: float | None = None) -> int:
    """``max_jobs`` and ``idle_exit_s`` (the consumer role's limits) override the environment's."""
    from ingress.security import InsecureStart, check_startup

    try:
        if (max_jobs is not None or idle_exit_s is not None) and role != "consumer":
            raise ValueError("--max-jobs and --idle-exit apply to --role consumer only")
        if max_jobs is not None and max_jobs < 1:
            raise ValueError(f"--max-jobs must be at least 1, not {max_jobs}")
        if idle_exit_s is not None and not idle_exit_s > 0:
            raise ValueError(f"--idle-exit must be a positive number of seconds, not {idle_exit_s:g}")
        settings = ServiceSettings.from_env(os.environ)
        overrides = {k: v for k, v in (("worker_max_jobs", max_jobs), ("worker_idle_exit_s", idle_exit_s))
                     if v is not None}
        if overrides:
            settings = settings.model_copy(update=overrides)
        configure_logging(level=settings.ingress.log_level, fmt=settings.ingress.log_format,
                          secrets=settings.secret_values(), role=role, uncaught=True)
        if role in ("all", "ingress"):
            check_startup(settings.ingress)
    except (ValueError, InsecureStart) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if role != "all" and settings.embedded_bus:
        # The embedded bus only connects the roles of one process.
        advice = ("set CDTRAIN_BUS_URL (amqp://...), or run `cdtrain serve` (all roles) for a one-machine "
                  "service")
        if role != "ingress":
            print(f"error: --role {role} alone on the embedded bus would never see a job: {advice}", file=sys.stderr)
            return 2
        log.warning("the ingress alone on the embedded bus accepts jobs that no worker will see: %s", advice)
    roles = ROLES if role == "all" else (role,)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, roles, stop)

    asyncio.run(run())
    return 0
