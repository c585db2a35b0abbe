"""RabbitBus: the MessageBus on RabbitMQ via aio-pika (robust connection, publisher confirms).

Channels: one for publishing (confirms on, unroutable messages raise), and one per
subscription, so a consumer's channel closing (a broker error, RabbitMQ's consumer_timeout)
never stops the publisher or another consumer. aio-pika's robust connection reopens channels,
re-declares what was declared on them and restarts their consumers after a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import aio_pika
from aio_pika import DeliveryMode, Message
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, ChannelPreconditionFailed
from aiormq.exceptions import PublishError as _Unroutable
from pydantic import BaseModel
from yarl import URL

from schemas.topology import QueueSpec, Topology

from .base import DeadLetter, DeadLetterHandler, Delivery, Handler, MessageBus, Subscription
from .codec import content_type, encode, resolve_model
from .dead import dead_letter_handler, read_dead_letter
from .declare import declare_queue, declare_topology
from .dispatch import OnError, run_handler
from .errors import BusError, BusUnavailable, DeliveryLost
from .settings import BusSettings

log = logging.getLogger(__name__)

_BROKER_ERRORS = (AMQPError, ConnectionError, OSError, asyncio.TimeoutError,
                  ChannelInvalidStateError)
# Watchers handle events one at a time, in order; this many may wait client-side.
_WATCHER_PREFETCH = 64


def masked_url(url: str) -> str:
    u = URL(url)
    return str(u.with_password("***")) if u.password else str(u)


class RabbitBus(MessageBus):
    def __init__(self, settings: BusSettings, topology: Topology | None = None) -> None:
        if settings.in_process:
            raise ValueError("RabbitBus needs an amqp:// URL; use InProcessBus for memory://")
        self.settings = settings
        self.topology = topology or Topology()
        self._where = masked_url(settings.url)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._declared: dict[str, Any] = {}
        self._connect_lock = asyncio.Lock()
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    # --- connection -----------------------------------------------------------------------
    async def connect(self) -> None:
        if self._closed:
            raise BusUnavailable("the bus is closed")
        if self._channel is not None:
            return
        async with self._connect_lock:
            if self._channel is None:
                await self._connect()

    async def _connect(self) -> None:
        s = self.settings
        try:
            conn = await aio_pika.connect_robust(
                s.url, timeout=s.connect_timeout, reconnect_interval=s.reconnect_interval,
                client_properties={"connection_name": s.app_id})
        except _BROKER_ERRORS as exc:
            raise BusUnavailable(f"RabbitMQ is unreachable at {self._where}: {_why(exc)}",
                                 retry_after=s.reconnect_interval) from exc
        try:
            async with asyncio.timeout(s.connect_timeout):
                channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
                self._declared = await declare_topology(channel, self.topology)
        except BaseException as exc:
            await _quietly(conn.close())
            if isinstance(exc, ChannelPreconditionFailed):
                raise BusError(
                    f"topology {self.topology.prefix!r} differs from what RabbitMQ at "
                    f"{self._where} already has ({exc}); queue arguments cannot change in "
                    "place: delete the queue or use a policy") from exc
            if isinstance(exc, _BROKER_ERRORS):
                raise BusUnavailable(f"RabbitMQ at {self._where} did not accept the topology: "
                                     f"{_why(exc)}", retry_after=s.reconnect_interval) from exc
            raise
        self._connection, self._channel = conn, channel

    async def close(self) -> None:
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        conn, self._connection, self._channel = self._connection, None, None
        if conn is not None:
            await _quietly(conn.close())

    def _require(self) -> tuple[AbstractRobustConnection, AbstractRobustChannel]:
        if self._connection is None or self._channel is None:
            raise BusUnavailable("the bus is closed")
        if not self._connection.connected.is_set() or self._channel.is_closed:
            raise BusUnavailable(f"the connection to RabbitMQ at {self._where} is down "
                                 "(reconnecting)", retry_after=self.settings.reconnect_interval)
        return self._connection, self._channel

    # --- publishing -----------------------------------------------------------------------
    async def publish_request(self, payload: BaseModel, *, message_id: str | None = None,
                              headers: Mapping[str, Any] | None = None) -> str:
        return await self._publish(self.topology.requests_exchange.name,
                                   self.topology.request_routing_key, payload, message_id,
                                   headers)

    async def publish_status(self, payload: BaseModel, routing_key: str, *,
                             message_id: str | None = None,
                             headers: Mapping[str, Any] | None = None) -> str:
        return await self._publish(self.topology.status_exchange.name, routing_key, payload,
                                   message_id, headers)

    async def publish_control(self, payload: BaseModel, routing_key: str, *,
                              message_id: str | None = None) -> str:
        # Not mandatory: with no worker running nothing is bound, and that is fine (the job
        # view holds the cancellation; the worker that claims the job reads it).
        return await self._publish(self.topology.control_exchange.name, routing_key, payload,
                                   message_id, None, mandatory=False)

    async def _publish(self, exchange_name: str, routing_key: str, payload: BaseModel,
                       message_id: str | None, headers: Mapping[str, Any] | None,
                       *, mandatory: bool = True) -> str:
        body = encode(payload)
        await self.connect()
        self._require()
        mid = message_id or uuid.uuid4().hex
        message = Message(body, content_type=content_type(payload),
                          delivery_mode=DeliveryMode.PERSISTENT, message_id=mid,
                          headers=dict(headers or {}), timestamp=datetime.now(timezone.utc),
                          app_id=self.settings.app_id, type=type(payload).__name__)
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                # Nothing above yields while connected, and aiormq writes a channel's frames under
                # a FIFO lock before awaiting the confirm: concurrent publishes go out in call
                # order (the ordering MessageBus promises).
                # mandatory: a message no queue takes is an error, not a silent drop.
                await self._declared[exchange_name].publish(message, routing_key,
                                                            mandatory=mandatory)
        except _Unroutable as exc:
            raise BusUnavailable(f"RabbitMQ at {self._where} could not route {routing_key!r} "
                                 f"on {exchange_name!r} to any queue") from exc
        except _BROKER_ERRORS as exc:
            raise BusUnavailable(f"RabbitMQ at {self._where} did not confirm the message: "
                                 f"{_why(exc)}",
                                 retry_after=self.settings.reconnect_interval) from exc
        return mid

    # --- consuming ------------------------------------------------------------------------
    async def consume_requests(self, handler: Handler[Any], *, model: type[Any] | None = None,
                               prefetch: int = 1) -> Subscription:
        return await self._consume(self.topology.requests_queue, handler, model, prefetch,
                                   source="requests", on_error="requeue", flow_control=True)

    async def consume_projector(self, handler: Handler[Any], *, model: type[Any] | None = None,
                                prefetch: int = 1) -> Subscription:
        return await self._consume(self.topology.projector_queue, handler, model, prefetch,
                                   source="projector", on_error="requeue", flow_control=True)

    async def consume_dead_requests(self, handler: DeadLetterHandler) -> Subscription:
        return await self._consume_dead(self.topology.requests_dead_queue, handler, "dead requests")

    async def consume_dead_status(self, handler: DeadLetterHandler) -> Subscription:
        return await self._consume_dead(self.topology.projector_dead_queue, handler, "dead status")

    async def _consume_dead(self, spec: QueueSpec, handler: DeadLetterHandler, source: str) -> Subscription:
        return await self._consume(spec, dead_letter_handler(handler, self.topology), bytes, 1, source=source,
                                   on_error="requeue", flow_control=True)

    async def subscribe_status(self, binding_key: str, handler: Handler[Any], *,
                               model: type[Any] | None = None) -> Subscription:
        spec = self.topology.watcher_queue(binding_key, watcher_id=uuid.uuid4().hex)
        return await self._consume(spec, handler, model, _WATCHER_PREFETCH,
                                   source=f"watch {binding_key}", on_error="drop",
                                   flow_control=False)

    async def subscribe_control(self, binding_key: str, handler: Handler[Any], *,
                                model: type[Any] | None = None) -> Subscription:
        spec = self.topology.control_queue(binding_key, subscriber_id=uuid.uuid4().hex)
        return await self._consume(spec, handler, model, _WATCHER_PREFETCH,
                                   source=f"control {binding_key}", on_error="drop",
                                   flow_control=False)

    async def _consume(self, spec: QueueSpec, handler: Handler[Any], model: type[Any] | None,
                       prefetch: int, *, source: str, on_error: OnError,
                       flow_control: bool) -> Subscription:
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        payload_model = resolve_model(handler, model)
        await self.connect()
        conn, _ = self._require()
        channel = conn.channel(publisher_confirms=False)
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await channel.initialize()
                queue = await declare_queue(channel, spec)
                consumer = _RabbitConsumer(
                    channel=channel, queue=queue, handler=handler, model=payload_model,
                    prefetch=prefetch, settings=self.settings, on_error=on_error,
                    source=source, flow_control=flow_control,
                    on_close=lambda: self._subscriptions.discard(consumer))
                await consumer.start()
        except BaseException as exc:
            await _quietly(channel.close())
            if isinstance(exc, _BROKER_ERRORS):
                raise BusUnavailable(f"cannot consume {spec.name!r} from RabbitMQ at "
                                     f"{self._where}: {_why(exc)}") from exc
            raise
        self._subscriptions.add(consumer)
        return consumer

    # --- queue state ----------------------------------------------------------------------
    async def request_backlog(self) -> int:
        return await self._backlog(self.topology.requests_queue.name)

    async def projector_backlog(self) -> int:
        return await self._backlog(self.topology.projector_queue.name)

    async def _backlog(self, name: str) -> int:
        await self.connect()
        self._require()
        queue = self._declared[name]
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                result = await queue.declare()  # same arguments: a no-op that reports counts
        except _BROKER_ERRORS as exc:
            raise BusUnavailable(f"RabbitMQ at {self._where}: {_why(exc)}") from exc
        return int(result.message_count or 0)

    async def drain_dead_requests(self, max_count: int = 100) -> list[DeadLetter]:
        await self.connect()
        conn, _ = self._require()
        out: list[DeadLetter] = []
        channel = conn.channel(publisher_confirms=False)
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                await channel.initialize()
                queue = await declare_queue(channel, self.topology.requests_dead_queue)
            while len(out) < max_count:
                async with asyncio.timeout(self.settings.publish_timeout):
                    msg = await queue.get(no_ack=False, fail=False)
                    if msg is None:
                        break
                    await msg.ack()
                out.append(read_dead_letter(msg.body, msg.message_id, dict(msg.headers or {}),
                                            self.topology))
        except _BROKER_ERRORS as exc:
            raise BusUnavailable(f"cannot read the dead letters from RabbitMQ at {self._where}: "
                                 f"{_why(exc)}") from exc
        finally:
            await _quietly(channel.close())
        return out


class _RabbitConsumer(Subscription):
    """A basic.consume whose running handlers never exceed ``prefetch``, early acks included.

    Broker prefetch only counts *unacked* deliveries. A handler that acks early (a long job)
    frees its slot while it still runs, and the broker would push the next request to this
    busy worker, where it would sit unacked until consumer_timeout. So (flow_control) an early
    ack first cancels the consumer (basic.cancel, awaited: nothing is delivered after
    cancel-ok), then acks, then consumes again with a window of ``prefetch - running``
    (none left with prefetch=1); when a handler ends, a cancelled consumer restarts.
    """

    def __init__(self, *, channel: AbstractRobustChannel, queue: AbstractQueue,
                 handler: Handler[Any], model: type[Any], prefetch: int, settings: BusSettings,
                 on_error: OnError, source: str, flow_control: bool,
                 on_close: Callable[[], None]) -> None:
        self._channel, self._queue = channel, queue
        self._handler, self._model = handler, model
        self._prefetch, self._settings = prefetch, settings
        self._on_error, self._source = on_error, source
        self._flow_control, self._on_close = flow_control, on_close
        self._ordered = not flow_control  # watchers: one at a time, in delivery order
        self._order_lock = asyncio.Lock()  # FIFO
        self._flow_lock = asyncio.Lock()
        self._tag: str | None = None
        self._running = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def start(self) -> None:
        async with self._flow_lock:
            await self._resume()

    async def _resume(self) -> None:  # flow lock held
        window = self._prefetch - self._running
        if self._closed or self._tag is not None or window <= 0:
            return
        # Per-consumer prefetch (global=False) is fixed at basic.consume time.
        await self._channel.set_qos(prefetch_count=window)
        self._tag = await self._queue.consume(self._on_message)

    async def _pause(self) -> None:  # flow lock held
        if self._tag is not None:
            tag, self._tag = self._tag, None
            await self._queue.cancel(tag)

    async def _refill(self) -> None:
        while not self._closed:
            try:
                async with self._flow_lock:
                    await self._resume()
                return
            except _BROKER_ERRORS as exc:
                log.warning("%s: cannot restart consuming (%s); retrying", self._source, exc)
                await asyncio.sleep(self._settings.reconnect_interval)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aiormq runs this callback in a task it cancels when the channel closes. A job
        # that already acked must survive that (a network blip must not kill hours of
        # training), so the handler runs in a task of ours; pre-ack handlers are still
        # stopped on channel loss, through Delivery's lost() future.
        self._running += 1  # before any await: _resume must count this delivery
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            if self._closed:
                return  # closing: leave it unacked, the channel close requeues it
            delivery = Delivery(body=message.body, message_id=message.message_id,
                                routing_key=message.routing_key or "",
                                headers=dict(message.headers or {}),
                                delivery_count=_delivery_count(message),
                                _settler=_RabbitSettler(self, message))
            if self._ordered:
                async with self._order_lock:  # tasks start, hence queue, in delivery order
                    await self._run(delivery)
            else:
                await self._run(delivery)
        finally:
            self._running -= 1
            if self._flow_control and self._tag is None and not self._closed:
                await self._refill()

    async def _run(self, delivery: Delivery) -> None:
        claim = self._settings.claim_timeout if self._on_error == "requeue" else None
        await run_handler(delivery, self._handler, self._model, claim_timeout=claim,
                          on_error=self._on_error, source=self._source)

    async def ack(self, message: AbstractIncomingMessage, *, early: bool) -> None:
        if not (early and self._flow_control):
            await message.ack()
            return
        async with self._flow_lock:
            await self._pause()
            await message.ack()
            await self._resume()  # with the smaller window, if prefetch > 1 leaves any
        # basic.ack has no reply; the broker answers a later RPC on the same channel only
        # after processing the ack, so this round trip turns "sent" into "done".
        await message.channel.queue_declare(queue=self._queue.name, passive=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._on_close()
        try:
            async with asyncio.timeout(self._settings.publish_timeout):
                async with self._flow_lock:
                    await self._pause()
        except (*_BROKER_ERRORS, RuntimeError) as exc:
            log.debug("%s: cancel on close failed: %s", self._source, exc)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _quietly(self._channel.close())


class _RabbitSettler:
    def __init__(self, consumer: _RabbitConsumer, message: AbstractIncomingMessage) -> None:
        self._consumer, self._message = consumer, message
        self._timeout = consumer._settings.publish_timeout

    async def ack(self, delivery: Delivery) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._consumer.ack(self._message, early=not delivery.handler_done)
        except _BROKER_ERRORS as exc:
            raise DeliveryLost(f"ack of message {self._message.message_id} not confirmed "
                               f"({_why(exc)}); it may be redelivered") from exc

    async def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                # On a quorum queue, requeue=True counts toward x-delivery-limit and
                # requeue=False dead-letters at once (reason "rejected").
                await self._message.nack(requeue=requeue)
        except _BROKER_ERRORS as exc:
            raise DeliveryLost(f"nack of message {self._message.message_id} failed "
                               f"({_why(exc)})") from exc

    def lost(self) -> asyncio.Future[Any]:
        try:
            return self._message.channel.closing
        except ChannelInvalidStateError:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done


def _delivery_count(message: AbstractIncomingMessage) -> int:
    # Quorum queues stamp x-delivery-count (failed deliveries so far) on each delivery.
    count = (message.headers or {}).get("x-delivery-count")
    if isinstance(count, int):
        return count
    return 1 if message.redelivered else 0


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, asyncio.TimeoutError):
        text = "timed out"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return f"{type(exc).__name__}: {text}"


async def _quietly(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception as exc:  # noqa: BLE001 - best-effort cleanup
        log.debug("ignored during cleanup: %s", exc)
