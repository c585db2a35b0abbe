"""Model <-> bytes, which content type a message gets, and which model a handler wants
(FastStream-style, from its signature).

The content type is decided here and nowhere else: a status event (a CloudEvent) always goes out
in CloudEvents structured mode, whoever publishes it, so any CloudEvents SDK reads it; every
other message is plain JSON. Readers decode by model, not by content type: a status event that
an older producer sent as ``application/json`` has the same body and reads the same.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable

from pydantic import BaseModel

from schemas.events import CLOUDEVENTS_CONTENT_TYPE, StatusEvent

CONTENT_TYPE = "application/json"


def content_type(payload: BaseModel) -> str:
    """The AMQP content type ``payload`` is published with."""
    return CLOUDEVENTS_CONTENT_TYPE if isinstance(payload, StatusEvent) else CONTENT_TYPE


def encode(payload: BaseModel) -> bytes:
    if not isinstance(payload, BaseModel):
        raise TypeError(f"the bus publishes pydantic models, not {type(payload).__name__}")
    if isinstance(payload, StatusEvent):
        # Structured mode: no null attributes (a CloudEvents reader takes null as a value).
        return payload.to_json_bytes()
    # by_alias: the wire format is what model_validate_json reads back (aliases included).
    return payload.model_dump_json(by_alias=True).encode()


def decode(body: bytes, model: type[Any]) -> Any:
    """``bytes`` passes the raw body; a pydantic model validates it (ValidationError if not)."""
    if model is bytes:
        return body
    return model.model_validate_json(body)


def resolve_model(handler: Callable[..., Any], model: type[Any] | None) -> type[Any]:
    """The payload type: ``model`` if given, else the annotation of the handler's 1st argument."""
    if model is None:
        params = list(inspect.signature(handler).parameters.values())
        try:
            hints = typing.get_type_hints(handler) if params else {}
        except Exception:  # noqa: BLE001 - e.g. a forward reference to a local class
            hints = {}
        model = hints.get(params[0].name) if params else None
    if model is bytes or (isinstance(model, type) and issubclass(model, BaseModel)):
        return model
    raise TypeError(
        f"cannot tell which payload {getattr(handler, '__qualname__', handler)!r} takes: "
        "annotate its first argument with a pydantic model (or bytes), or pass model=..."
    )
