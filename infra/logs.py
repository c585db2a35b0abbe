"""Process logging: plain text by default, one JSON object per line with ``CDTRAIN_LOG_FORMAT=json``.

    configure_logging(level="INFO", fmt="json", secrets=settings.secret_values(), role="consumer")
    with log_context(job_id=job.job_id, attempt=2):
        log.info("training")   # {"time": ..., "level": "INFO", ..., "job_id": "...", "attempt": 2, "role": "consumer"}

The fields a record carries beyond its message (``job_id``, ``attempt``, ``role``) come from
context variables, so a log line deep in a library still names the job it belongs to: the worker
sets them while it runs a job (its training thread inherits them through ``asyncio.to_thread``),
the projector while it projects an event, and each role of ``cdtrain serve`` its role. Every
handler gets the :class:`~schemas.redact.RedactingFilter` first, so a secret is masked before
either formatter sees the record.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, Literal

from schemas.redact import RedactingFilter, Redactor

__all__ = ["CONTEXT_FIELDS", "ContextFilter", "JsonFormatter", "LogFormat", "TEXT_FORMAT", "configure_logging",
           "current_log_context", "log_context", "set_log_context"]

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("job_id", "attempt", "role")

_OURS = "_cdtrain_handler"
_VARS: dict[str, contextvars.ContextVar[Any]] = {
    name: contextvars.ContextVar(f"cdtrain_log_{name}", default=None) for name in CONTEXT_FIELDS
}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Log records made inside the block (in this task, and in threads it starts through
    ``asyncio.to_thread``) carry ``fields``; the previous values come back after it."""
    unknown = set(fields) - set(_VARS)
    if unknown:
        raise ValueError(f"unknown log context fields: {sorted(unknown)}")
    tokens = [(_VARS[name], _VARS[name].set(value)) for name, value in fields.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def set_log_context(**fields: Any) -> None:
    """Set ``fields`` for the rest of the current task (or thread): a role's task sets its role."""
    for name, value in fields.items():
        _VARS[name].set(value)


def current_log_context() -> dict[str, Any]:
    return {name: value for name, var in _VARS.items() if (value := var.get()) is not None}


class ContextFilter(logging.Filter):
    """Copies the context fields onto each record, in the thread that logs it (the formatter may
    run elsewhere). A field given with ``extra=`` wins; ``defaults`` fill what the context does
    not know (the process's role, for threads that libraries start without our context)."""

    def __init__(self, defaults: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.defaults = {k: v for k, v in (defaults or {}).items() if v is not None}

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in {**self.defaults, **current_log_context()}.items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    the context fields that are known, and ``exception`` / ``stack`` when present."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        # exc_text first: the redacting filter has masked it already.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(*, level: str | int = "INFO", fmt: LogFormat = "text", secrets: Iterable[str | None] = (),
                      role: str | None = None, stream: Any = None, uncaught: bool = False) -> logging.Handler:
    """Configure the root logger once per process: one stream handler (stderr by default) with
    the redacting filter, the context filter and the chosen format. ``role`` is the process's
    role field wherever the context sets none (a role's task in ``cdtrain serve --role all`` sets
    its own). ``uncaught``: an exception that ends the process (or a thread) is logged through
    the handler too, so that it is masked, and one JSON line in the JSON format (a process's
    entry point sets it; a test would not want its hooks replaced). Returns the handler."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    # Redaction first: the context filter adds nothing secret, and both formatters read the
    # record the redacting filter has cleaned.
    redacting = RedactingFilter(Redactor(secrets))
    handler.addFilter(redacting)
    handler.addFilter(ContextFilter({"role": role}))
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OURS, False):
            root.removeHandler(old)  # configured again: the new settings win
        else:
            old.addFilter(redacting)  # a handler someone else installed leaks no secret either
    root.addHandler(handler)
    root.setLevel(level)
    if uncaught:
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)
    return handler


def _log_uncaught(exc_type: type[BaseException], exc: BaseException | None, tb: Any) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc or exc_type(), tb)
        return
    logging.getLogger("cdtrain").critical("uncaught exception", exc_info=(exc_type, exc, tb))
