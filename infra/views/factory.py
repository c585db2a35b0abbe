"""Pick a view store from one setting: a URL."""

from __future__ import annotations

from pathlib import Path

from infra.views.memory import InMemoryJobViewStore
from infra.views.mongo import DEFAULT_COLLECTION, MongoJobViewStore
from infra.views.store import JobViewStore


def open_view_store(
    url: str | None, *, database: str | None = None, collection: str = DEFAULT_COLLECTION
) -> JobViewStore:
    """``mongodb://…`` / ``mongodb+srv://…`` -> MongoDB; ``memory://`` or empty -> in memory;
    ``file:///path/views.json`` or a path ending in ``.json`` -> in memory, persisted there.
    """
    if not url or url == "memory://":
        return InMemoryJobViewStore()
    if url.startswith(("mongodb://", "mongodb+srv://")):
        return MongoJobViewStore.connect(url, database=database, collection=collection)
    if url.startswith("file://"):
        return InMemoryJobViewStore(Path(url[len("file://") :]))
    if url.endswith(".json"):
        return InMemoryJobViewStore(Path(url))
    raise ValueError(f"unsupported view store URL {url!r}: use mongodb://…, memory:// or file:///….json")
