"""Embedded bus for a one-machine quick start: RabbitMQ's semantics, in memory, one process.

What matches RabbitBus (and is tested against both): confirmed publish (the message is queued
when publish returns), prefetch as a bound on running handlers, requeue on a failed or timed
out pre-ack phase, dead-lettering after ``delivery_limit`` failures (returned messages go to
the head, as quorum queues do) into dead-letter queues that can be consumed, with RabbitMQ's
death headers, topic routing with ``*``/``#``, per-watcher ordering.
What does not: nothing survives the process, and there is no channel to lose.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from schemas.topology import ALL_JOBS, Topology

from .base import DeadLetter, DeadLetterHandler, Delivery, Handler, MessageBus, Subscription
from .codec import encode, resolve_model
from .dead import dead_letter_handler, death_headers, read_dead_letter
from .dispatch import OnError, run_handler
from .errors import BusUnavailable
from .settings import BusSettings
from .topic import topic_matches


@dataclass
class _Envelope:
    body: bytes
    message_id: str
    routing_key: str
    headers: dict[str, Any]
    delivery_count: int = 0


class _MemQueue:
    """FIFO with requeue-at-head; a message that fails here goes to ``dead`` (if any)."""

    def __init__(self, name: str, delivery_limit: int | None = None, dead: _MemQueue | None = None) -> None:
        self.name = name
        self.delivery_limit = delivery_limit
        self.dead = dead
        self._items: deque[_Envelope] = deque()
        self._nonempty = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, env: _Envelope, *, head: bool = False) -> None:
        (self._items.appendleft if head else self._items.append)(env)
        self._nonempty.set()

    async def get(self) -> _Envelope:
        while not self._items:
            self._nonempty.clear()
            await self._nonempty.wait()
        return self._items.popleft()

    def pop_nowait(self) -> _Envelope | None:
        return self._items.popleft() if self._items else None

    def dead_letter(self, env: _Envelope, reason: str) -> None:
        if self.dead is not None:  # only queues with a DLX keep their dead
            headers = {**env.headers, **death_headers(self.name, reason)}
            self.dead.put(_Envelope(env.body, env.message_id, env.routing_key, headers))


@dataclass
class _MemSettler:
    queue: _MemQueue
    env: _Envelope

    async def ack(self, delivery: Delivery) -> None:
        return None

    async def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        if not requeue:
            self.queue.dead_letter(self.env, "rejected")
            return
        self.env.delivery_count += 1
        limit = self.queue.delivery_limit
        if limit is not None and self.env.delivery_count > limit:
            self.queue.dead_letter(self.env, "delivery_limit")
        else:
            self.queue.put(self.env, head=True)

    def lost(self) -> None:
        return None


@dataclass(eq=False)
class _MemConsumer(Subscription):
    queue: _MemQueue
    handler: Handler[Any]
    model: type[Any]
    prefetch: int
    claim_timeout: float | None
    on_error: OnError
    source: str
    on_close: Callable[[], None] = lambda: None
    _loop_task: asyncio.Task[None] | None = None
    _running: set[asyncio.Task[None]] = field(default_factory=set)
    _closed: bool = False

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self.prefetch)
        while True:
            await slots.acquire()
            env = await self.queue.get()
            task = asyncio.create_task(self._one(env))
            self._running.add(task)
            task.add_done_callback(lambda t: (self._running.discard(t), slots.release()))

    async def _one(self, env: _Envelope) -> None:
        delivery = Delivery(body=env.body, message_id=env.message_id,
                            routing_key=env.routing_key, headers=dict(env.headers),
                            delivery_count=env.delivery_count,
                            _settler=_MemSettler(self.queue, env))
        await run_handler(delivery, self.handler, self.model, claim_timeout=self.claim_timeout,
                          on_error=self.on_error, source=self.source)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.on_close()
        tasks = [t for t in (self._loop_task, *self._running) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class MemoryBroker:
    """The queues themselves. Buses sharing one broker talk to each other (ingress + worker
    in one quick-start process), as RabbitBus instances do through RabbitMQ."""

    def __init__(self, topology: Topology | None = None) -> None:
        self.topology = t = topology or Topology()
        self.requests_dead = _MemQueue(t.requests_dead_queue.name)
        self.requests = _MemQueue(t.requests_queue.name, t.delivery_limit, dead=self.requests_dead)
        self.projector_dead = _MemQueue(t.projector_dead_queue.name)
        self.projector = _MemQueue(t.projector_queue.name, t.projector_delivery_limit, dead=self.projector_dead)
        self.watchers: list[tuple[str, _MemQueue]] = []
        self.controls: list[tuple[str, _MemQueue]] = []  # one queue per control subscriber


class InProcessBus(MessageBus):
    def __init__(self, settings: BusSettings | None = None, topology: Topology | None = None,
                 broker: MemoryBroker | None = None) -> None:
        self.settings = settings or BusSettings()
        self.broker = broker or MemoryBroker(topology)
        if topology is not None and topology != self.broker.topology:
            raise ValueError("topology differs from the shared broker's")
        self.topology = self.broker.topology
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    async def connect(self) -> None:
        self._check_open()

    async def close(self) -> None:
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()

    def _check_open(self) -> None:
        if self._closed:
            raise BusUnavailable("the in-process bus is closed")

    # The publishes queue their message before any await: publishes started in some order are
    # queued in that order (MessageBus), however their callers await them.
    async def publish_request(self, payload: BaseModel, *, message_id: str | None = None,
                              headers: Mapping[str, Any] | None = None) -> str:
        self._check_open()
        env = _envelope(payload, self.topology.request_routing_key, message_id, headers)
        self.broker.requests.put(env)
        return env.message_id

    async def publish_status(self, payload: BaseModel, routing_key: str, *,
                             message_id: str | None = None,
                             headers: Mapping[str, Any] | None = None) -> str:
        self._check_open()
        env = _envelope(payload, routing_key, message_id, headers)
        # The projector queue is durable and bound to job.#: it gets every event, even
        # while no projector runs (as the broker would keep them).
        for binding, queue in [(ALL_JOBS, self.broker.projector), *self.broker.watchers]:
            if topic_matches(binding, routing_key):
                queue.put(_Envelope(env.body, env.message_id, routing_key, dict(env.headers)))
        return env.message_id

    async def publish_control(self, payload: BaseModel, routing_key: str, *,
                              message_id: str | None = None) -> str:
        self._check_open()
        env = _envelope(payload, routing_key, message_id, None)
        for binding, queue in self.broker.controls:  # no subscriber: dropped, as on RabbitMQ
            if topic_matches(binding, routing_key):
                queue.put(_Envelope(env.body, env.message_id, routing_key, {}))
        return env.message_id

    async def subscribe_control(self, binding_key: str, handler: Handler[Any], *,
                                model: type[Any] | None = None) -> Subscription:
        # Validates the binding key exactly as the RabbitMQ control queue would.
        self.topology.control_queue(binding_key, subscriber_id="check")
        return self._subscribe(self.broker.controls, binding_key, handler, model, f"control {binding_key}")

    async def consume_requests(self, handler: Handler[Any], *, model: type[Any] | None = None,
                               prefetch: int = 1) -> Subscription:
        return self._consume(self.broker.requests, handler, model, prefetch, "requests",
                             claim_timeout=self.settings.claim_timeout, on_error="requeue")

    async def consume_projector(self, handler: Handler[Any], *, model: type[Any] | None = None,
                                prefetch: int = 1) -> Subscription:
        return self._consume(self.broker.projector, handler, model, prefetch, "projector",
                             claim_timeout=self.settings.claim_timeout, on_error="requeue")

    async def consume_dead_requests(self, handler: DeadLetterHandler) -> Subscription:
        return self._consume_dead(self.broker.requests_dead, handler, "dead requests")

    async def consume_dead_status(self, handler: DeadLetterHandler) -> Subscription:
        return self._consume_dead(self.broker.projector_dead, handler, "dead status")

    def _consume_dead(self, queue: _MemQueue, handler: DeadLetterHandler, source: str) -> Subscription:
        return self._consume(queue, dead_letter_handler(handler, self.topology), bytes, 1, source,
                             claim_timeout=self.settings.claim_timeout, on_error="requeue")

    async def subscribe_status(self, binding_key: str, handler: Handler[Any], *,
                               model: type[Any] | None = None) -> Subscription:
        # Validates the binding key exactly as the RabbitMQ watcher queue would.
        self.topology.watcher_queue(binding_key, watcher_id="check")
        return self._subscribe(self.broker.watchers, binding_key, handler, model, f"watch {binding_key}")

    def _subscribe(self, entries: list, binding_key: str, handler: Handler[Any], model: type[Any] | None,
                   source: str) -> Subscription:
        """A live subscriber's own queue, bound by a topic key; dropped with the subscription."""
        queue = _MemQueue(source)
        entry = (binding_key, queue)
        sub = self._consume(queue, handler, model, 1, source, claim_timeout=None, on_error="drop",
                            on_close=lambda: entries.remove(entry))
        entries.append(entry)
        return sub

    def _consume(self, queue: _MemQueue, handler: Handler[Any], model: type[Any] | None,
                 prefetch: int, source: str, *, claim_timeout: float | None,
                 on_error: OnError, on_close: Callable[[], None] | None = None) -> Subscription:
        self._check_open()
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")

        def closed() -> None:
            self._subscriptions.discard(consumer)
            if on_close is not None:
                on_close()

        consumer = _MemConsumer(queue, handler, resolve_model(handler, model), prefetch,
                                claim_timeout, on_error, source, on_close=closed)
        consumer.start()
        self._subscriptions.add(consumer)
        return consumer

    async def request_backlog(self) -> int:
        self._check_open()
        return len(self.broker.requests)

    async def projector_backlog(self) -> int:
        self._check_open()
        return len(self.broker.projector)

    async def drain_dead_requests(self, max_count: int = 100) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        while len(out) < max_count and (env := self.broker.requests_dead.pop_nowait()) is not None:
            out.append(read_dead_letter(env.body, env.message_id, env.headers, self.topology))
        return out


def _envelope(payload: BaseModel, routing_key: str, message_id: str | None,
              headers: Mapping[str, Any] | None) -> _Envelope:
    # Serialise now, as the broker path does, so both backends hand handlers the same bytes.
    return _Envelope(encode(payload), message_id or uuid.uuid4().hex, routing_key,
                     dict(headers or {}))
