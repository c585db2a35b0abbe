"""Prometheus metrics plumbing shared by every role: the registry, the exposition, a small server.

Each process makes one :class:`~prometheus_client.CollectorRegistry` (:func:`new_registry`) and
hands it to the parts that record metrics; nothing here touches prometheus_client's global
default registry, so a test gives each part a registry of its own and reads exactly what that
part recorded.

The ingress serves the registry on its HTTP port (``GET /metrics``, ingress/metrics.py). The
worker and the projector have no HTTP server of their own: :class:`MetricsServer` is one, on
``CDTRAIN_METRICS_PORT``, in a thread, so a scrape still answers while the event loop is busy.
Label values never carry a job id, a URI or anything a user chose: a label's values must stay a
small fixed set (each value is a time series kept for ever by Prometheus).
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, start_http_server

__all__ = ["MetricsServer", "PREFIX", "new_registry", "render"]

log = logging.getLogger(__name__)

PREFIX = "cdtrain"


def new_registry() -> CollectorRegistry:
    """A registry of this process's own (never prometheus_client's global one)."""
    return CollectorRegistry(auto_describe=True)


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition of ``registry`` in the format ``accept`` asks for (Prometheus' text format
    0.0.4 unless OpenMetrics is asked for), and its content type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class MetricsServer:
    """``/metrics`` (any path, in fact) of ``registry`` on ``host:port``, served from a thread.

    ``port=0`` takes a free port (tests); :attr:`port` is the one bound. A port in use is logged
    and left alone: a second process on the machine must not lose its training for a metrics
    endpoint.
    """

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return int(self._server.server_address[1]) if self._server is not None else None

    def start(self) -> bool:
        try:
            self._server, self._thread = start_http_server(self.requested_port, addr=self.host,
                                                           registry=self.registry)
        except OSError as exc:
            log.warning("metrics server not started on %s:%d (%s); this process exports no metrics",
                        self.host, self.requested_port, exc)
            return False
        log.info("metrics at http://%s:%d/metrics", self.host, self.port)
        return True

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
