"""Credentials out of text that leaves a process: logs, status events, job views, MLflow.

Two layers. :func:`redact_credentials` knows the *shapes* of secrets (a password in a URL, a
presigned URL's signature, a bearer token) and is applied to every error text a job publishes.
:class:`Redactor` adds the *values* a process was configured with (its tokens, keys and URL
passwords) and guards that process's logs (:class:`RedactingFilter`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

__all__ = ["MASK", "RedactingFilter", "Redactor", "redact_credentials", "url_password"]

MASK = "***"

# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(?P<tail>@)")
# Presigned URLs (AWS SigV4 and V2, GCS, Azure SAS): the query carries the credential.
# The same names in an AWS4 Authorization header ("Credential=..., Signature=...") as logged by
# an HTTP client's debug output.
_SIGNED_QUERY = re.compile(
    r"(?P<head>(?:^|[?&,\s])(?:X-Amz-(?:Signature|Credential|Security-Token)|X-Goog-(?:Signature|Credential)"
    r"|Signature|Credential|AWSAccessKeyId|sig|SharedAccessSignature)=)[^&\s\"',]+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<head>\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def redact_credentials(text: str) -> str:
    """``text`` with URL passwords, presigned-URL credentials and bearer tokens masked."""
    text = _URL_PASSWORD.sub(rf"\g<head>{MASK}\g<tail>", text)
    text = _SIGNED_QUERY.sub(rf"\g<head>{MASK}", text)
    return _BEARER.sub(rf"\g<head>{MASK}", text)


def url_password(url: str | None) -> str | None:
    """The password inside a service URL (amqp://user:pw@host), if any."""
    if not url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


class Redactor:
    """Masks the given secret values, then the shapes :func:`redact_credentials` knows."""

    # Shorter values would mask ordinary words ("guest"); a secret that short is no secret.
    MIN_LENGTH = 6

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        given = [s for s in secrets if s]
        # A URL's password is percent-encoded there, and decoded wherever a driver repeats it.
        values = {v for s in given for v in (s, unquote(s)) if len(v) >= self.MIN_LENGTH}
        # Longest first: a secret that contains another is masked whole.
        self._pattern = (re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))
                         if values else None)

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return redact_credentials(text)


class RedactingFilter(logging.Filter):
    """On a handler: every record it writes, exception text included, goes through ``redact``.

    Handler filters see records propagated from every library's logger; a logger's own filters
    would not.
    """

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True

    def install(self, logger: logging.Logger | None = None) -> None:
        """Add this filter to every handler of ``logger`` (the root logger by default)."""
        for handler in (logger or logging.getLogger()).handlers:
            handler.addFilter(self)
