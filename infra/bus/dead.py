"""Dead letters: what RabbitMQ's dead-letter headers say, read the same way on both backends.

RabbitMQ stamps a dead-lettered message with ``x-first-death-reason``/``-queue``/``-exchange``
and an ``x-death`` list (one entry per queue and reason, newest first, with a ``count`` of
deaths, not of deliveries). It drops the quorum queue's ``x-delivery-count``, so how often a
message was delivered is known only from its reason: ``delivery_limit`` means the source queue's
limit + 1 deliveries (the topology declared that limit). The in-process bus stamps the same
headers (:func:`death_headers`), so one reader (:func:`read_dead_letter`) serves both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.topology import Topology

from .base import DeadLetter, DeadLetterHandler, Delivery, Handler


def death_headers(queue: str, reason: str) -> dict[str, Any]:
    """The headers RabbitMQ adds when ``queue`` dead-letters a message (the in-process bus)."""
    return {
        "x-first-death-reason": reason,
        "x-first-death-queue": queue,
        "x-death": [{"queue": queue, "reason": reason, "count": 1}],
    }


def read_dead_letter(body: bytes, message_id: str | None, headers: Mapping[str, Any],
                     topology: Topology) -> DeadLetter:
    """A dead-lettered message with its reason, its queue and, when they tell, its deliveries."""
    headers = {k: v for k, v in headers.items() if k != "x-delivery-count"}  # the dead queue's own
    deaths = headers.get("x-death") or []
    newest = deaths[0] if deaths else {}
    reason = _text(headers.get("x-first-death-reason") or newest.get("reason")) or "unknown"
    queue = _text(headers.get("x-first-death-queue") or newest.get("queue"))
    limits = {spec.name: spec.delivery_limit for spec in topology.queues()}
    limit = limits.get(queue) if queue is not None else None
    deliveries = limit + 1 if reason == "delivery_limit" and limit is not None else None
    return DeadLetter(body=body, message_id=message_id, headers=headers, reason=reason, queue=queue,
                      deliveries=deliveries)


def dead_letter_handler(handler: DeadLetterHandler, topology: Topology) -> Handler[bytes]:
    """A bus handler (raw body) that hands ``handler`` the :class:`DeadLetter` it carries."""

    async def on_dead(body: bytes, delivery: Delivery) -> None:
        await handler(read_dead_letter(body, delivery.message_id, delivery.headers, topology), delivery)

    return on_dead


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
