"""What the request handlers need, held by the application (one object, replaced per test)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ingress.bucket_events import BucketEventHandler
from ingress.cancel import Canceller
from ingress.submit import Submitter, ViewReader

if TYPE_CHECKING:
    from infra.bus.base import MessageBus
    from ingress.settings import IngressSettings


@dataclass
class Deps:
    settings: IngressSettings
    bus: MessageBus
    views: ViewReader
    submitter: Submitter
    bucket_events: BucketEventHandler
    canceller: Canceller
    # Live SSE streams: shutdown puts None in each so they end instead of holding the server.
    streams: set[asyncio.Queue[Any]] = field(default_factory=set)


DEPS = web.AppKey("cdtrain_ingress_deps", Deps)
