"""Ingress settings: one pydantic model, built from the environment in one place only.

Everything below the process entry point receives an :class:`IngressSettings` (or one of its
parts); only :meth:`IngressSettings.from_env` reads environment variables, so a test builds
settings directly and nothing can pick up a stray variable.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, field_validator

from infra.bus.settings import BusSettings
from infra.objects.allow_list import UriAllowList
from infra.objects.models import S3Settings
from infra.secret_files import TOKEN_VARS, with_secret_files
from schemas.redact import url_password
from schemas.jobs import ARCHIVE_SUFFIXES, MODEL_NAME_PATTERN

__all__ = ["AmqpListenerSettings", "IngressSettings", "SqsSettings", "TriggerSettings", "ENV_VARS"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TriggerSettings(_Frozen):
    """Which bucket objects start a training job (see :mod:`ingress.trigger`)."""

    prefix: str = "datasets/"
    # Empty: every bucket that sends us events. Set it when one target serves several buckets.
    buckets: frozenset[str] = frozenset()
    archive_suffixes: tuple[str, ...] = ARCHIVE_SUFFIXES
    marker_name: str = Field("_READY", min_length=1)
    config_name: str = Field("train_config.yaml", min_length=1)
    # Used when no train_config.yaml sits beside the dataset; None = the worker's defaults.
    default_config_uri: str | None = None
    # A dataset dropped in a bucket is meant to end as a registered model (the product's promise).
    register_model: bool = True
    model_name: str = Field("snunet-cbam", pattern=MODEL_NAME_PATTERN)


class AmqpListenerSettings(_Frozen):
    """Where MinIO's AMQP notification target publishes (MINIO_NOTIFY_AMQP_* must match)."""

    url: str
    exchange: str = "bucketevents"
    exchange_type: Literal["direct", "fanout", "topic"] = "fanout"
    # Must equal MinIO's MINIO_NOTIFY_AMQP_DURABLE (its default is off; we recommend on): an
    # exchange declared twice with different flags is a channel error for whoever comes second.
    exchange_durable: bool = True
    routing_key: str = "bucketlogs"
    queue: str = "cdtrain.bucket-events"
    prefetch: int = Field(8, ge=1)
    # Pause before a message that hit a transient failure (bus/store down) goes back.
    retry_delay_s: float = Field(2.0, ge=0)


class SqsSettings(_Frozen):
    """An SQS queue that receives the bucket's S3 event notifications (AWS S3 -> SQS)."""

    queue_url: str
    endpoint_url: str | None = None  # None = AWS's endpoint for `region`
    region: str = "us-east-1"
    # 20 s is SQS's maximum long poll: one empty receive per 20 s per poller when idle.
    wait_time_s: int = Field(20, ge=0, le=20)
    max_messages: int = Field(10, ge=1, le=10)
    # A message that failed transiently becomes visible again after this long.
    retry_visibility_s: int = Field(10, ge=0, le=43200)
    error_backoff_s: float = Field(2.0, ge=0)


def _allow_list(value: Any) -> Any:
    return UriAllowList.parse(value) if isinstance(value, str) else value


class IngressSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Names this process in the CloudEvents `source` of the QUEUED events it emits.
    instance: str = "ingress"
    # "token": /train* and the webhook need their bearer tokens (ingress/security.py says when
    # they must be set); "none": nobody is asked for one, and every start says so.
    auth: Literal["token", "none"] = "token"
    api_token: SecretStr | None = None
    webhook_token: SecretStr | None = None
    # None: not configured, which only the embedded one-machine mode accepts (ingress/security.py).
    allowed_uris: Annotated[UriAllowList | None, BeforeValidator(_allow_list)] = None

    bus: BusSettings = BusSettings()
    topology_prefix: str = Field("cdtrain", pattern=r"^[A-Za-z0-9_\-]+$")
    view_store_url: str = "memory://"
    view_store_database: str | None = None
    s3: S3Settings = S3Settings()
    # Set: bucket lookups (train_config.yaml beside a dataset) read this directory instead of S3.
    local_objects_dir: Path | None = None

    trigger: TriggerSettings = TriggerSettings()
    bucket_events_amqp: AmqpListenerSettings | None = None
    sqs: SqsSettings | None = None

    # Bound on one view-store call in a request; past it the client gets 503, not a hang.
    store_timeout_s: float = Field(5.0, gt=0)
    retry_after_s: float = Field(5.0, gt=0)
    list_default_limit: int = Field(50, ge=1, le=1000)
    # SSE comment lines at this interval keep proxies from closing an idle stream and reveal
    # a client that went away.
    sse_heartbeat_s: float = Field(15.0, gt=0)
    client_max_size: int = Field(1 << 20, ge=1024)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "json": one JSON object per line (infra/logs.py), for log collectors; every role reads it here.
    log_format: Annotated[Literal["text", "json"],
                          BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = "text"

    @property
    def enforced_api_token(self) -> SecretStr | None:
        """The token /train* asks for; None: open (CDTRAIN_AUTH=none, or local-only without one)."""
        return None if self.auth == "none" else self.api_token

    @property
    def enforced_webhook_token(self) -> SecretStr | None:
        return None if self.auth == "none" else self.webhook_token

    def secret_values(self) -> list[str | None]:
        """Every credential these settings hold, for the log redactor (schemas/redact.py)."""
        secrets = [s.get_secret_value() if s else None
                   for s in (self.api_token, self.webhook_token, self.s3.secret_access_key, self.s3.session_token)]
        urls = [self.bus.url, self.view_store_url, self.bucket_events_amqp.url if self.bucket_events_amqp else None]
        return secrets + [url_password(url) for url in urls]

    @field_validator("api_token", "webhook_token")
    @classmethod
    def _not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty: give a token, or unset it")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "IngressSettings":
        """Build settings from ``environ`` (pass ``os.environ`` at the entry point).

        Variables are listed in :data:`ENV_VARS` and docs/api.md; a bad value raises
        ValueError naming the variable. Secrets may come from files (``CDTRAIN_API_TOKEN_FILE``...).
        """
        environ = with_secret_files(environ)
        for var in TOKEN_VARS:
            # Unset variables mean "no token"; an empty one is a mistake, never "auth off".
            if var in environ and not environ[var].strip():
                raise ValueError(f"invalid ingress settings: {var} is set but empty: give a token, or unset it "
                                 "(CDTRAIN_AUTH=none runs without auth)")
        env = {k: v for k, v in environ.items() if v != ""}
        values: dict[str, Any] = {}
        for var, path in ENV_VARS.items():
            if var in env:
                _put(values, path, env[var])
        if "instance" not in values:
            values["instance"] = env.get("HOSTNAME") or socket.gethostname() or "ingress"
        if "trigger" in values and "buckets" in values["trigger"]:
            values["trigger"]["buckets"] = [b.strip() for b in values["trigger"]["buckets"].split(",") if b.strip()]
        try:
            values["s3"] = S3Settings.from_env(env)
            for name, required, family in (("bucket_events_amqp", "url", "CDTRAIN_BUCKET_EVENTS_AMQP_"),
                                           ("sqs", "queue_url", "CDTRAIN_SQS_")):
                if name in values and required not in values[name]:
                    raise ValueError(f"{family}* variables are set but {_FIELD_TO_ENV[(name, required)]} "
                                     "is not: set it to enable that listener")
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None


# Environment variable -> field path. The one table of every variable the ingress reads.
ENV_VARS: dict[str, tuple[str, ...]] = {
    "CDTRAIN_HOST": ("host",),
    "CDTRAIN_PORT": ("port",),
    "CDTRAIN_INSTANCE": ("instance",),
    "CDTRAIN_AUTH": ("auth",),
    "CDTRAIN_API_TOKEN": ("api_token",),
    "CDTRAIN_WEBHOOK_TOKEN": ("webhook_token",),
    "CDTRAIN_ALLOWED_URIS": ("allowed_uris",),
    "CDTRAIN_BUS_URL": ("bus", "url"),
    "CDTRAIN_TOPOLOGY_PREFIX": ("topology_prefix",),
    "CDTRAIN_MONGODB_URL": ("view_store_url",),
    "CDTRAIN_MONGODB_DATABASE": ("view_store_database",),
    "CDTRAIN_LOCAL_OBJECTS_DIR": ("local_objects_dir",),
    "CDTRAIN_TRIGGER_PREFIX": ("trigger", "prefix"),
    "CDTRAIN_TRIGGER_BUCKETS": ("trigger", "buckets"),
    "CDTRAIN_TRIGGER_REGISTER_MODEL": ("trigger", "register_model"),
    "CDTRAIN_TRIGGER_MODEL_NAME": ("trigger", "model_name"),
    "CDTRAIN_DEFAULT_CONFIG_URI": ("trigger", "default_config_uri"),
    "CDTRAIN_BUCKET_EVENTS_AMQP_URL": ("bucket_events_amqp", "url"),
    "CDTRAIN_BUCKET_EVENTS_AMQP_EXCHANGE": ("bucket_events_amqp", "exchange"),
    "CDTRAIN_BUCKET_EVENTS_AMQP_EXCHANGE_TYPE": ("bucket_events_amqp", "exchange_type"),
    "CDTRAIN_BUCKET_EVENTS_AMQP_EXCHANGE_DURABLE": ("bucket_events_amqp", "exchange_durable"),
    "CDTRAIN_BUCKET_EVENTS_AMQP_ROUTING_KEY": ("bucket_events_amqp", "routing_key"),
    "CDTRAIN_BUCKET_EVENTS_AMQP_QUEUE": ("bucket_events_amqp", "queue"),
    "CDTRAIN_SQS_QUEUE_URL": ("sqs", "queue_url"),
    "CDTRAIN_SQS_ENDPOINT_URL": ("sqs", "endpoint_url"),
    "CDTRAIN_SQS_REGION": ("sqs", "region"),
    "CDTRAIN_SQS_WAIT_S": ("sqs", "wait_time_s"),
    "CDTRAIN_SSE_HEARTBEAT_S": ("sse_heartbeat_s",),
    "CDTRAIN_LOG_LEVEL": ("log_level",),
    "CDTRAIN_LOG_FORMAT": ("log_format",),
}
_FIELD_TO_ENV = {path: var for var, path in ENV_VARS.items()}


def _put(values: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    node = values
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        var = next((v for n in range(len(loc), 0, -1) if (v := _FIELD_TO_ENV.get(loc[:n]))), None)
        where = var or ".".join(loc) or "settings"
        problems.append(f"{where}: {str(err['msg']).removeprefix('Value error, ')}")
    return "invalid ingress settings: " + "; ".join(problems)
