"""The message topology: every exchange, queue, argument and binding, declared once, typed.

Ingress, worker, projector and tests all declare from this one description, so a queue's
arguments can never drift between processes (RabbitMQ refuses a re-declaration with different
arguments: ``PRECONDITION_FAILED - inequivalent arg``). Pure data: no I/O, no broker client.

Names (prefix ``cdtrain``; tests pass ``test-<uuid>`` to get an isolated set)::

    cdtrain.requests              direct exchange  --"train"-->  cdtrain.train-requests (quorum)
    cdtrain.requests.dlx          fanout exchange  ----------->  cdtrain.train-requests.dead
    cdtrain.status                topic exchange   --"job.#"-->  cdtrain.projector (quorum)
                                                   --"job.<id>.*" or "job.#"--> watcher queues
    cdtrain.status.dlx            fanout exchange  ----------->  cdtrain.projector.dead
    cdtrain.control               topic exchange   --"cancel.*"--> cdtrain.control.<worker> (one per worker)

Status routing keys are ``job.<job_id>.<state>`` (state in lower case), so a watcher binds
``job.<job_id>.*`` for one job or ``job.#`` for all of them. Control commands (cancel) are routed
``cancel.<job_id>``; every worker binds ``cancel.*`` and acts only on the job it runs.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ALL_CANCELS",
    "ALL_JOBS",
    "BindingSpec",
    "ExchangeSpec",
    "ExchangeType",
    "QueueSpec",
    "Topology",
    "cancel_routing_key",
    "job_binding_key",
]

ALL_JOBS = "job.#"
"""Binding key that matches every status event of every job."""

ALL_CANCELS = "cancel.*"
"""Binding key that matches the cancel command of every job (a worker's control queue)."""

# A job id becomes one word of a routing key: no dots (word separator) and no wildcards.
_JOB_ID_WORD = re.compile(r"^[A-Za-z0-9_\-]+$")


def job_binding_key(job_id: str) -> str:
    """Binding key that matches every status event of one job: ``job.<job_id>.*``."""
    if not _JOB_ID_WORD.match(job_id):
        raise ValueError(f"job id {job_id!r} cannot be a routing-key word (use [A-Za-z0-9_-])")
    return f"job.{job_id}.*"


def cancel_routing_key(job_id: str) -> str:
    """Routing key of a job's cancel command on the control exchange: ``cancel.<job_id>``."""
    if not _JOB_ID_WORD.match(job_id):
        raise ValueError(f"job id {job_id!r} cannot be a routing-key word (use [A-Za-z0-9_-])")
    return f"cancel.{job_id}"


class ExchangeType(str, Enum):
    DIRECT = "direct"
    FANOUT = "fanout"
    TOPIC = "topic"


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExchangeSpec(_Spec):
    name: str = Field(min_length=1)
    type: ExchangeType
    durable: bool = True
    auto_delete: bool = False


class BindingSpec(_Spec):
    exchange: str = Field(min_length=1)
    routing_key: str = ""


class QueueSpec(_Spec):
    name: str = Field(min_length=1)
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = Field(default_factory=dict)
    bindings: tuple[BindingSpec, ...] = ()

    @property
    def is_quorum(self) -> bool:
        return self.arguments.get("x-queue-type") == "quorum"

    @property
    def delivery_limit(self) -> int | None:
        return self.arguments.get("x-delivery-limit")


class Topology(_Spec):
    """All names and arguments of the service's bus, derived from one ``prefix``.

    ``delivery_limit`` is how many *failed* deliveries (nack/requeue, a consumer's channel
    closing with the message unacked) RabbitMQ tolerates before dead-lettering a message:
    a message is delivered at most ``delivery_limit + 1`` times. Changing it for an existing
    queue needs the queue deleted (or a policy), because queue arguments are immutable.
    """

    prefix: str = Field("cdtrain", pattern=r"^[A-Za-z0-9_\-]+$")
    delivery_limit: int = Field(5, ge=0)
    projector_delivery_limit: int = Field(10, ge=0)
    # Watcher (SSE) queues: a slow client must not grow a broker queue without bound; the
    # oldest events are dropped first (the client re-reads the job view after a gap).
    watcher_max_length: int = Field(10_000, ge=1)

    request_routing_key: str = "train"

    # --- exchanges ------------------------------------------------------------------------
    @property
    def requests_exchange(self) -> ExchangeSpec:
        return ExchangeSpec(name=f"{self.prefix}.requests", type=ExchangeType.DIRECT)

    @property
    def requests_dlx(self) -> ExchangeSpec:
        return ExchangeSpec(name=f"{self.prefix}.requests.dlx", type=ExchangeType.FANOUT)

    @property
    def status_exchange(self) -> ExchangeSpec:
        return ExchangeSpec(name=f"{self.prefix}.status", type=ExchangeType.TOPIC)

    @property
    def status_dlx(self) -> ExchangeSpec:
        return ExchangeSpec(name=f"{self.prefix}.status.dlx", type=ExchangeType.FANOUT)

    @property
    def control_exchange(self) -> ExchangeSpec:
        """Commands to running workers (cancel). Fire-and-forget: a command no worker is bound
        for is dropped, because the job view holds the durable record (docs/bus.md)."""
        return ExchangeSpec(name=f"{self.prefix}.control", type=ExchangeType.TOPIC)

    # --- durable queues -------------------------------------------------------------------
    @property
    def requests_queue(self) -> QueueSpec:
        return QueueSpec(
            name=f"{self.prefix}.train-requests",
            arguments=_quorum_args(self.requests_dlx.name, self.delivery_limit),
            bindings=(BindingSpec(exchange=self.requests_exchange.name,
                                  routing_key=self.request_routing_key),),
        )

    @property
    def requests_dead_queue(self) -> QueueSpec:
        return QueueSpec(
            name=f"{self.prefix}.train-requests.dead",
            arguments={"x-queue-type": "quorum"},
            bindings=(BindingSpec(exchange=self.requests_dlx.name),),
        )

    @property
    def projector_queue(self) -> QueueSpec:
        return QueueSpec(
            name=f"{self.prefix}.projector",
            arguments=_quorum_args(self.status_dlx.name, self.projector_delivery_limit),
            bindings=(BindingSpec(exchange=self.status_exchange.name, routing_key=ALL_JOBS),),
        )

    @property
    def projector_dead_queue(self) -> QueueSpec:
        return QueueSpec(
            name=f"{self.prefix}.projector.dead",
            arguments={"x-queue-type": "quorum"},
            bindings=(BindingSpec(exchange=self.status_dlx.name),),
        )

    # --- per-subscriber queues ------------------------------------------------------------
    def watcher_queue(self, binding_key: str, watcher_id: str) -> QueueSpec:
        """An exclusive, auto-delete queue for one live watcher (an SSE client, a CLI).

        It lives only as long as the watcher's connection, so no cleanup is needed after a
        crash. Classic, not quorum: exclusive queues cannot be quorum queues, and losing a
        live view's buffer on a broker restart is fine (the job view is the source of truth).
        """
        return self._exclusive_queue("watch", self.status_exchange, binding_key, watcher_id)

    def control_queue(self, binding_key: str, subscriber_id: str) -> QueueSpec:
        """An exclusive, auto-delete queue for one worker's control commands.

        Like a watcher queue it lives as long as the worker's connection: a command sent while
        no worker listens is not needed later, since a worker reads the job view when it claims
        a job (consumer/worker.py).
        """
        return self._exclusive_queue("control", self.control_exchange, binding_key, subscriber_id)

    def _exclusive_queue(self, kind: str, exchange: ExchangeSpec, binding_key: str, owner: str) -> QueueSpec:
        _check_binding_key(binding_key)
        if not _JOB_ID_WORD.match(owner):
            raise ValueError(f"{kind} queue owner id {owner!r} must match [A-Za-z0-9_-]+")
        return QueueSpec(
            name=f"{self.prefix}.{kind}.{owner}",
            durable=False,
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": self.watcher_max_length, "x-overflow": "drop-head"},
            bindings=(BindingSpec(exchange=exchange.name, routing_key=binding_key),),
        )

    # --- what to declare ------------------------------------------------------------------
    def exchanges(self) -> tuple[ExchangeSpec, ...]:
        return (self.requests_exchange, self.requests_dlx, self.status_exchange, self.status_dlx,
                self.control_exchange)

    def queues(self) -> tuple[QueueSpec, ...]:
        """The durable queues, dead-letter queues first (their exchanges must route on day 1)."""
        return (self.requests_dead_queue, self.requests_queue,
                self.projector_dead_queue, self.projector_queue)


def _quorum_args(dlx: str, delivery_limit: int) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": dlx,
        # At-least-once dead-lettering (3.10+): a poison message stays in the source queue
        # until the dead-letter queue has confirmed it, instead of being lost in transit.
        # RabbitMQ requires reject-publish overflow with this strategy.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def _check_binding_key(key: str) -> None:
    words = key.split(".")
    if not key or any(w == "" for w in words):
        raise ValueError(f"binding key {key!r} has an empty word")
    for w in words:
        if w not in ("*", "#") and not _JOB_ID_WORD.match(w):
            raise ValueError(f"binding key {key!r}: word {w!r} must be *, # or [A-Za-z0-9_-]+")
