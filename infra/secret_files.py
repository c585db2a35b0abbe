"""``VAR_FILE`` variables: a secret read from a file (Kubernetes and Docker secrets mount files).

``CDTRAIN_API_TOKEN_FILE=/run/secrets/api-token`` sets ``CDTRAIN_API_TOKEN`` to the file's text,
without its trailing newline. Applied once at the process edge, before settings are built.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["SECRET_VARS", "TOKEN_VARS", "with_secret_files"]

TOKEN_VARS = ("CDTRAIN_API_TOKEN", "CDTRAIN_WEBHOOK_TOKEN")
# Every variable that can hold a credential, alone or inside a URL.
SECRET_VARS = (
    *TOKEN_VARS,
    "CDTRAIN_BUS_URL",
    "CDTRAIN_MONGODB_URL",
    "CDTRAIN_BUCKET_EVENTS_AMQP_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def with_secret_files(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with every ``<SECRET>_FILE`` replaced by ``<SECRET>``; raises ValueError naming the
    variable when both are set, the file cannot be read, or it is empty."""
    env = dict(environ)
    for var in SECRET_VARS:
        file_var = f"{var}_FILE"
        path = env.pop(file_var, None)
        if path is None:
            continue
        if env.get(var):
            raise ValueError(f"{var} and {file_var} are both set: keep one")
        try:
            value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file_var}: cannot read {path} ({exc.__class__.__name__}: {exc})") from None
        if not value.strip():
            raise ValueError(f"{file_var}: {path} is empty")
        env[var] = value
    return env
