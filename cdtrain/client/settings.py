"""Where the client connects and how patiently: one frozen settings object.

The environment is read in one place only, :meth:`ClientSettings.from_env`, which the CLI entry
(:func:`cdtrain.client.cli.run`) calls with ``os.environ``; everything below takes the object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "CDTRAIN_URL"
TOKEN_ENV = "CDTRAIN_API_TOKEN"


class ClientSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = DEFAULT_URL
    token: SecretStr | None = None  # sent as "Authorization: Bearer <token>"
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    # No byte on an event stream (the server pings every 15 s) for this long: the stream is dead.
    stream_idle_timeout_s: float = Field(60.0, gt=0)
    # watch: pause before reconnecting a dropped stream, and how long to keep trying.
    reconnect_delay_s: float = Field(3.0, ge=0)
    reconnect_give_up_s: float = Field(300.0, ge=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, url: str | None = None, **overrides: Any) -> "ClientSettings":
        """``url`` (from ``--url``) wins over ``CDTRAIN_URL``; the token is ``CDTRAIN_API_TOKEN``."""
        token = environ.get(TOKEN_ENV) or None
        return cls(url=url or environ.get(URL_ENV) or DEFAULT_URL,
                   token=SecretStr(token) if token else None, **overrides)
