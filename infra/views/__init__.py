"""Job views (the read model): the store protocol, its backends and the projector."""

from infra.views.factory import open_view_store
from infra.views.memory import InMemoryJobViewStore
from infra.views.merge import InvalidCursor, plan_update
from infra.views.mongo import MongoJobViewStore
from infra.views.outage import StoreOutage
from infra.views.projector import Projector
from infra.views.store import JobViewStore

__all__ = [
    "InMemoryJobViewStore",
    "InvalidCursor",
    "JobViewStore",
    "MongoJobViewStore",
    "Projector",
    "StoreOutage",
    "open_view_store",
    "plan_update",
]
