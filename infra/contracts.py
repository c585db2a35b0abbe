"""The bus's published contracts written to files, for tools and reviews that read them offline.

    from infra.contracts import write_asyncapi, write_status_data_schema
    write_asyncapi("build/asyncapi.json")                 # the AsyncAPI 3.0 document of the bus
    write_status_data_schema("build/status-event-data.json")  # the JSON Schema ``dataschema`` names

The same documents the ingress serves (``GET /asyncapi.json``, ``GET /schemas/status-event-data.json``).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from schemas.asyncapi import build_asyncapi
from schemas.events import status_data_json_schema
from schemas.topology import Topology

__all__ = ["package_version", "write_asyncapi", "write_status_data_schema"]


def package_version() -> str:
    """The installed package's version (the documents' ``info.version``)."""
    try:
        return metadata.version("cdtrain")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def write_asyncapi(path: str | Path, topology: Topology | None = None, *, version: str | None = None,
                   host: str = "localhost:5672") -> Path:
    """Write the AsyncAPI document of ``topology`` (default: the production one) to ``path``."""
    return _write(path, build_asyncapi(topology, version=version or package_version(), host=host))


def write_status_data_schema(path: str | Path) -> Path:
    """Write the JSON Schema of a status event's ``data`` (its ``$id`` is the events' ``dataschema``)."""
    return _write(path, status_data_json_schema())


def _write(path: str | Path, document: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return out
