"""Picks the bus from settings: ``memory://`` -> InProcessBus, ``amqp(s)://`` -> RabbitBus."""

from __future__ import annotations

from schemas.topology import Topology

from .base import MessageBus
from .inprocess import InProcessBus
from .settings import BusSettings


def create_bus(settings: BusSettings, topology: Topology | None = None) -> MessageBus:
    if settings.in_process:
        return InProcessBus(settings, topology)
    # Imported here so a quick start on the in-process bus never needs aio-pika.
    from .rabbit import RabbitBus

    return RabbitBus(settings, topology)
