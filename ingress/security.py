"""Refuse to start insecurely, as MinIO and RabbitMQ do, unless told to.

Outside the embedded one-machine mode on loopback, the ingress needs both bearer tokens and an
allow-list of dataset locations; ``CDTRAIN_AUTH=none`` and ``CDTRAIN_ALLOWED_URIS=*`` are the
explicit ways out, and every start that takes one says so in a warning.
"""

from __future__ import annotations

import ipaddress
import logging

from ingress.settings import IngressSettings

__all__ = ["InsecureStart", "check_startup", "is_local_only"]

log = logging.getLogger(__name__)


class InsecureStart(Exception):
    """The settings would expose the service; the message says what to set."""


def is_local_only(settings: IngressSettings) -> bool:
    """The embedded one-machine mode, listening on loopback only: nobody else can reach it."""
    if not settings.bus.in_process:
        return False
    if settings.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        return False


def check_startup(settings: IngressSettings) -> None:
    """Raise InsecureStart naming every missing setting, or log the opt-outs taken."""
    local = is_local_only(settings)
    problems = []
    if settings.auth == "none":
        log.warning("CDTRAIN_AUTH=none: anyone who reaches %s:%d can start, read and cancel jobs", settings.host,
                    settings.port)
    elif not local:
        missing = [var for var, token in (("CDTRAIN_API_TOKEN", settings.api_token),
                                          ("CDTRAIN_WEBHOOK_TOKEN", settings.webhook_token)) if token is None]
        if missing:
            problems.append(f"{' and '.join(missing)} not set (or *_FILE); to run without auth, set "
                            "CDTRAIN_AUTH=none")
    if settings.allowed_uris is None:
        if not local:
            problems.append("CDTRAIN_ALLOWED_URIS not set: list the s3://bucket/prefix locations jobs may read, "
                            "or '*' for any location the workers can read")
    elif settings.allowed_uris.allow_any:
        log.warning("CDTRAIN_ALLOWED_URIS=*: jobs may read any location the workers' credentials can read")
    default_config = settings.trigger.default_config_uri
    if default_config and settings.allowed_uris is not None and settings.allowed_uris.refusal(default_config):
        problems.append("CDTRAIN_DEFAULT_CONFIG_URI is not under CDTRAIN_ALLOWED_URIS")
    if problems:
        raise InsecureStart(f"refusing to start the ingress on {settings.host}:{settings.port}: "
                            + "; ".join(problems))
    if local and settings.auth == "token" and settings.api_token is None:
        log.info("no API token: the embedded service on %s answers only this machine", settings.host)
