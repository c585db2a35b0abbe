"""The message bus shared by ingress, worker and projector (no torch, no snunet_cbam here).

    bus = create_bus(BusSettings(url="amqp://guest:guest@127.0.0.1:5672/"), Topology())
    await bus.connect()
    await bus.publish_request(request)                   # confirmed, or BusUnavailable
    await bus.consume_requests(handle)                   # handle(req: TrainRequest, d: Delivery)
    await bus.publish_status(event, "job.<id>.running")  # topic exchange cdtrain.status
    sub = await bus.subscribe_status("job.<id>.*", on_event)  # live watcher; sub.close()

See docs/bus.md for the topology, the delivery rules and the long-job (early-ack) mode.
"""

from .base import DeadLetter, DeadLetterHandler, Delivery, Handler, MessageBus, Subscription
from .errors import BusError, BusUnavailable, DeliveryLost
from .factory import create_bus
from .heartbeat import heartbeat
from .inprocess import InProcessBus, MemoryBroker
from .settings import IN_PROCESS_URL, BusSettings
from .topic import topic_matches

__all__ = [
    "IN_PROCESS_URL",
    "BusError",
    "BusSettings",
    "BusUnavailable",
    "DeadLetter",
    "DeadLetterHandler",
    "Delivery",
    "DeliveryLost",
    "Handler",
    "InProcessBus",
    "MemoryBroker",
    "MessageBus",
    "Subscription",
    "create_bus",
    "heartbeat",
    "topic_matches",
]


def __getattr__(name: str) -> object:
    # RabbitBus pulls in aio-pika; load it on first use only.
    if name == "RabbitBus":
        from .rabbit import RabbitBus

        return RabbitBus
    raise AttributeError(name)
