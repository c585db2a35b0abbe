"""Declares schemas.topology specs on an aio-pika channel (idempotent: same spec, no-op)."""

from __future__ import annotations

from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from schemas.topology import ExchangeSpec, QueueSpec, Topology


async def declare_exchange(channel: AbstractChannel, spec: ExchangeSpec) -> AbstractExchange:
    return await channel.declare_exchange(spec.name, ExchangeType(spec.type.value),
                                          durable=spec.durable, auto_delete=spec.auto_delete)


async def declare_queue(channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
    queue = await channel.declare_queue(spec.name, durable=spec.durable, exclusive=spec.exclusive,
                                        auto_delete=spec.auto_delete,
                                        arguments=dict(spec.arguments))
    for binding in spec.bindings:
        await queue.bind(binding.exchange, routing_key=binding.routing_key)
    return queue


async def declare_topology(channel: AbstractChannel,
                           topology: Topology) -> dict[str, AbstractExchange | AbstractQueue]:
    """Exchanges first (queues bind to them), then queues; returns them by name."""
    declared: dict[str, AbstractExchange | AbstractQueue] = {}
    for ex in topology.exchanges():
        declared[ex.name] = await declare_exchange(channel, ex)
    for q in topology.queues():
        declared[q.name] = await declare_queue(channel, q)
    return declared
