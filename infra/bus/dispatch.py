"""Runs one handler on one delivery with the bus's settlement rules (shared by both backends).

Pre-ack phase (bounded by ``claim_timeout``, cut short if the delivery is lost): an exception,
a timeout or a lost channel requeues the message (RabbitMQ counts it toward the delivery
limit). Post-ack phase (unbounded: hours of training): the message is already gone, so a
failure there is the handler's to report (a FAILED status), not the bus's to retry.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from pydantic import ValidationError

from .base import Delivery, Handler
from .codec import decode
from .errors import BusError

log = logging.getLogger(__name__)

OnError = Literal["requeue", "drop"]


async def run_handler(delivery: Delivery, handler: Handler[Any], model: type[Any], *,
                      claim_timeout: float | None, on_error: OnError, source: str) -> None:
    try:
        payload = decode(delivery.body, model)
    except (ValidationError, ValueError) as exc:
        # Never valid, however often retried: straight to the dead-letter queue.
        log.error("%s: message %s is not a valid %s, dead-lettering it: %s",
                  source, delivery.message_id, model.__name__, exc)
        await _settle(delivery, requeue=False, source=source)
        return

    task = asyncio.create_task(handler(payload, delivery))
    try:
        if not await _pre_ack_phase(task, delivery, claim_timeout, source):
            return
        await asyncio.wait({task})  # the handler's own outcome is read below, not raised here
    except asyncio.CancelledError:
        # The subscription is closing (or our caller was cancelled): stop the handler too.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _settle(delivery, requeue=on_error == "requeue", source=source)
        raise
    failure = asyncio.CancelledError() if task.cancelled() else task.exception()
    if failure is not None:
        if delivery.settled:
            log.error("%s: handler failed after acking message %s; it will not be redelivered "
                      "(the handler must report the failure itself)", source,
                      delivery.message_id, exc_info=failure)
        else:
            log.error("%s: handler failed on message %s (delivery %d)%s", source,
                      delivery.message_id, delivery.delivery_count + 1,
                      ", requeueing it" if on_error == "requeue" else "", exc_info=failure)
            await _settle(delivery, requeue=on_error == "requeue", source=source)
        return
    delivery.handler_done = True
    if not delivery.settled:
        try:
            await delivery.ack()
        except BusError as exc:
            log.warning("%s: could not ack message %s (%s); it will be redelivered",
                        source, delivery.message_id, exc)


async def _pre_ack_phase(task: asyncio.Task[None], delivery: Delivery,
                         claim_timeout: float | None, source: str) -> bool:
    """Wait until the handler acks or ends. False if it was stopped here (delivery settled)."""
    acked = asyncio.ensure_future(delivery._acked.wait())
    lost = delivery._settler.lost()
    waiters: set[asyncio.Future[Any]] = {task, acked}
    if lost is not None:
        waiters.add(lost)
    try:
        await asyncio.wait(waiters, timeout=claim_timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        was_lost = lost is not None and lost.done() and not lost.cancelled()
        acked.cancel()
        if lost is not None:
            lost.cancel()  # only detaches this observer (it would live as long as the channel)
    if task.done() or delivery.acked:
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if delivery.acked:  # acked just as it was cancelled: the message is gone, the work too
        log.error("%s: handler for message %s was stopped right after acking it",
                  source, delivery.message_id)
        return False
    if was_lost:
        log.warning("%s: channel closed before message %s was acked; the broker requeued it, "
                    "handler cancelled", source, delivery.message_id)
        return False
    log.error("%s: handler did not ack message %s within claim_timeout=%ss; cancelled and "
              "requeued (long jobs must ack early, see docs/bus.md)",
              source, delivery.message_id, claim_timeout)
    await _settle(delivery, requeue=True, source=source)
    return False


async def _settle(delivery: Delivery, *, requeue: bool, source: str) -> None:
    try:
        await delivery._reject(requeue=requeue)
    except BusError as exc:
        log.warning("%s: could not settle message %s (%s); the broker will redeliver it",
                    source, delivery.message_id, exc)

