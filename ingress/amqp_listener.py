"""Bucket events from an AMQP queue: MinIO's AMQP notification target publishes them there.

MinIO publishes each notification to an exchange with a routing key (MINIO_NOTIFY_AMQP_*);
this listener declares the same exchange, a durable quorum queue of its own, binds the two,
and consumes. A message is acked once its objects have been handled (jobs confirmed on the
bus), so an ingress that dies mid-way leaves it for redelivery, which the per-object job id
makes harmless.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from ingress.bucket_events import BucketEventHandler
from ingress.errors import Unavailable
from ingress.settings import AmqpListenerSettings
from schemas.bucket_events import BucketEventError

log = logging.getLogger(__name__)


class AmqpBucketListener:
    def __init__(self, settings: AmqpListenerSettings, handler: BucketEventHandler) -> None:
        self.settings = settings
        self.handler = handler
        self.handled = 0  # messages settled (acked or rejected), for tests and logs
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None

    async def start(self) -> None:
        s = self.settings
        # Robust: after a broker restart it reconnects, re-declares and resumes consuming.
        self._connection = await aio_pika.connect_robust(
            s.url, client_properties={"connection_name": "cdtrain-ingress-bucket-events"})
        try:
            self._channel = await self._connection.channel()
            await self._channel.set_qos(prefetch_count=s.prefetch)
            # Declared as MinIO declares it (whoever starts first creates it).
            exchange = await self._channel.declare_exchange(s.exchange, aio_pika.ExchangeType(s.exchange_type),
                                                            durable=s.exchange_durable)
            queue = await self._channel.declare_queue(s.queue, durable=True,
                                                      arguments={"x-queue-type": "quorum"})
            await queue.bind(exchange, routing_key=s.routing_key)
            await queue.consume(self._on_message)
        except BaseException:
            await self.close()
            raise
        log.info("consuming bucket events from queue %r (exchange %r, key %r)", s.queue, s.exchange, s.routing_key)

    async def close(self) -> None:
        conn, self._connection, self._channel = self._connection, None, None
        if conn is not None:
            await conn.close()  # unacked messages go back to the queue

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            results = await self.handler.handle(message.body)
        except BucketEventError as exc:
            # Never valid, however often retried: drop it, loudly.
            log.error("dropping AMQP message %s: not a bucket notification: %s (body starts %r)",
                      message.message_id, exc, message.body[:200])
            await message.reject(requeue=False)
        except Exception as exc:  # noqa: BLE001 - Unavailable or a bug: keep the event, retry
            level = logging.WARNING if isinstance(exc, Unavailable) else logging.ERROR
            log.log(level, "bucket event not handled (%s); requeueing it in %g s", exc,
                    self.settings.retry_delay_s, exc_info=not isinstance(exc, Unavailable))
            # Paced: an immediate requeue would spin on the message while the bus is down.
            await asyncio.sleep(self.settings.retry_delay_s)
            await message.nack(requeue=True)
        else:
            await message.ack()
            for r in results:
                log.debug("AMQP bucket event %s: %s %s", r.uri, r.action, r.job_id or r.reason)
        self.handled += 1
