"""The bus interface every process codes against; RabbitBus and InProcessBus implement it.

Delivery semantics, identical for both backends:

* ``publish_*`` returns only once the message is safely queued (RabbitMQ: publisher confirm);
  otherwise it raises :class:`BusUnavailable`.
* Publishes one bus starts in some order are routed in that order, even when their confirms
  are awaited together (``asyncio.gather``): a subscriber bound to both sees them in that order.
  RabbitBus sends them on its one publishing channel in call order and RabbitMQ routes one
  channel's messages in the order it got them; InProcessBus queues a message before its
  publish first yields.
* A handler is ``async def handler(payload: Model, delivery: Delivery) -> None``. The model
  comes from ``model=`` or the handler's first annotation; ``bytes`` gets the raw body.
* Requests and projector events: at most ``prefetch`` handlers run at once. The delivery is
  acked when the handler returns, or earlier by ``await delivery.ack()`` (the long-job mode,
  see docs/bus.md). A handler that raises *before* the ack gets its message requeued; after
  ``topology.delivery_limit`` such failures the message is dead-lettered. A payload that does
  not validate is dead-lettered at once. The pre-ack phase is bounded by ``claim_timeout``.
* Status watchers: every matching subscriber gets every event, in publish order; a failing
  watcher handler loses that event (watchers are live views, not the record).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from schemas.topology import Topology

__all__ = ["DeadLetter", "DeadLetterHandler", "Delivery", "Handler", "MessageBus", "Settler", "Subscription"]

M = TypeVar("M")
Handler = Callable[[M, "Delivery"], Awaitable[None]]
DeadLetterHandler = Callable[["DeadLetter", "Delivery"], Awaitable[None]]


class Settler(Protocol):
    """Backend side of a delivery: how to ack/requeue/dead-letter it, and when it is lost."""

    async def ack(self, delivery: Delivery) -> None: ...

    async def reject(self, delivery: Delivery, *, requeue: bool) -> None: ...

    def lost(self) -> asyncio.Future[Any] | None:
        """A future that completes when the delivery can no longer be settled (or None)."""
        ...


@dataclass(eq=False)
class Delivery:
    """One received message. ``delivery_count`` is how many earlier deliveries failed."""

    body: bytes
    message_id: str | None
    routing_key: str
    headers: Mapping[str, Any]
    delivery_count: int
    _settler: Settler = field(repr=False)
    _acked: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _settled: bool = field(default=False, init=False, repr=False)
    # Set by the dispatcher once the handler returned: an ack before that is an *early* ack.
    handler_done: bool = field(default=False, init=False, repr=False)

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def acked(self) -> bool:
        return self._acked.is_set()

    async def ack(self) -> None:
        """Remove the message from its queue. Idempotent.

        Called by the handler before it returns, this *claims* the message early: the broker
        forgets it, so a job running for hours no longer holds an unacked delivery (RabbitMQ
        3.10 closes the channel after 30 minutes). Returns once the broker processed the ack;
        raises :class:`DeliveryLost` if that cannot be confirmed (stop working on it).
        """
        if self._settled:
            return
        # Settled for good even if the ack fails: a later nack of a tag the broker may have
        # acked already is a channel error (PRECONDITION_FAILED), which would cost more.
        self._settled = True
        await self._settler.ack(self)
        self._acked.set()

    async def _reject(self, *, requeue: bool) -> None:
        if self._settled:
            return
        self._settled = True
        await self._settler.reject(self, requeue=requeue)


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered message, as consumed or drained from a dead-letter queue."""

    body: bytes
    message_id: str | None
    headers: Mapping[str, Any]
    reason: str  # "delivery_limit" or "rejected" (invalid payload), as RabbitMQ names them
    queue: str | None = None  # the queue that dead-lettered it
    # How many times it was delivered before it died: known for reason "delivery_limit" (its
    # queue's limit + 1; RabbitMQ drops x-delivery-count when it dead-letters), else None.
    deliveries: int | None = None


class Subscription(abc.ABC):
    """A running consumer or watcher. ``close()`` stops it and cancels running handlers."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class MessageBus(abc.ABC):
    """Commands (train requests) in a work queue; status events on a topic exchange."""

    topology: Topology

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and declare the topology (idempotent). Raises BusUnavailable."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every subscription and release the connection. Idempotent."""

    @abc.abstractmethod
    async def publish_request(self, payload: BaseModel, *, message_id: str | None = None,
                              headers: Mapping[str, Any] | None = None) -> str:
        """Queue a train request; returns its message id once confirmed."""

    @abc.abstractmethod
    async def publish_status(self, payload: BaseModel, routing_key: str, *,
                             message_id: str | None = None,
                             headers: Mapping[str, Any] | None = None) -> str:
        """Publish a status event with routing key ``job.<job_id>.<state>``; confirmed. A
        :class:`~schemas.events.StatusEvent` goes out in CloudEvents structured mode (the
        content type is the codec's to decide, never the caller's)."""

    @abc.abstractmethod
    async def consume_requests(self, handler: Handler[Any], *, model: type[Any] | None = None,
                               prefetch: int = 1) -> Subscription:
        """Run ``handler`` for each train request (see the module doc for the semantics)."""

    @abc.abstractmethod
    async def consume_projector(self, handler: Handler[Any], *, model: type[Any] | None = None,
                                prefetch: int = 1) -> Subscription:
        """Run ``handler`` for every status event, from the projector's durable queue."""

    @abc.abstractmethod
    async def subscribe_status(self, binding_key: str, handler: Handler[Any], *,
                               model: type[Any] | None = None) -> Subscription:
        """Live watcher: events whose routing key matches ``binding_key``, in order."""

    # Control commands (cancel) are fire-and-forget: published without ``mandatory`` (no worker
    # listening is normal), confirmed by the broker, delivered to every matching subscriber.
    # Not abstract so that wrappers written before them (test doubles) still instantiate.
    async def publish_control(self, payload: BaseModel, routing_key: str, *,
                              message_id: str | None = None) -> str:
        """Publish a command with routing key ``cancel.<job_id>`` on the control exchange."""
        raise NotImplementedError(f"{type(self).__name__} has no control channel")

    async def subscribe_control(self, binding_key: str, handler: Handler[Any], *,
                                model: type[Any] | None = None) -> Subscription:
        """Commands whose routing key matches ``binding_key``, in order, on a queue of this
        subscriber's own that lives as long as its connection (a failing handler loses one)."""
        raise NotImplementedError(f"{type(self).__name__} has no control channel")

    @abc.abstractmethod
    async def request_backlog(self) -> int:
        """Requests waiting in the queue (not counting those being processed)."""

    async def projector_backlog(self) -> int:
        """Status events waiting in the projector queue (not counting those being projected).

        The watchdog's "caught up" signal (consumer/watchdog.py): RabbitMQ's passive count of
        ready messages, the in-process queue's length."""
        raise NotImplementedError(f"{type(self).__name__} cannot count the projector queue")

    @abc.abstractmethod
    async def drain_dead_requests(self, max_count: int = 100) -> list[DeadLetter]:
        """Remove and return up to ``max_count`` dead-lettered requests (to inspect/replay)."""

    # Dead letters, consumed: ``handler(letter, delivery)`` gets each message of a dead-letter
    # queue as a DeadLetter (its body undecoded: it may be what killed it), one at a time; it is
    # acked when the handler returns and requeued if it raises. Dead-letter queues have no
    # delivery limit, so a handler must not raise for a letter it will never handle: log and
    # return (drop) instead. Not abstract, like the control channel.
    async def consume_dead_requests(self, handler: DeadLetterHandler) -> Subscription:
        """Run ``handler`` for every dead-lettered train request (``…train-requests.dead``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot consume dead letters")

    async def consume_dead_status(self, handler: DeadLetterHandler) -> Subscription:
        """Run ``handler`` for every dead-lettered status event (``…projector.dead``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot consume dead letters")

    async def __aenter__(self) -> MessageBus:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
