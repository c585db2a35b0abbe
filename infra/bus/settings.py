"""Bus settings, injected by each process's config (nothing here reads the environment)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

IN_PROCESS_URL = "memory://"


class BusSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # "memory://" selects the embedded InProcessBus (one-machine quick start); an
    # amqp:// or amqps:// URL selects RabbitMQ. AMQP heartbeat etc. go in the URL query.
    url: str = IN_PROCESS_URL
    app_id: str = "cdtrain"
    connect_timeout: float = Field(5.0, gt=0)
    # Upper bound on one publish, confirm included; past it the caller gets BusUnavailable.
    publish_timeout: float = Field(10.0, gt=0)
    reconnect_interval: float = Field(2.0, gt=0)
    # Longest a handler may hold a delivery unacked. Must stay below the broker's
    # consumer_timeout (RabbitMQ 3.10: 30 min), or the broker closes the channel first.
    claim_timeout: float = Field(20 * 60.0, gt=0)

    @property
    def in_process(self) -> bool:
        return self.url.startswith(IN_PROCESS_URL)
