"""Pydantic models at the object-store boundary: what an object is, how to reach S3."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ObjectInfo(BaseModel):
    """Metadata of one stored object, as HEAD or LIST report it."""

    model_config = ConfigDict(frozen=True)

    bucket: str
    key: str
    size: int = Field(ge=0)
    # Without the surrounding quotes S3 puts on the wire, so both stores compare equal.
    etag: str
    version_id: str | None = None
    last_modified: datetime


class S3Settings(BaseModel):
    """How to reach an S3-compatible endpoint (AWS, MinIO, moto). Built by the composition root."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None = None  # None = AWS's own endpoint for `region`
    region: str = "us-east-1"
    # None = botocore's default credential chain (instance role, ~/.aws, ...).
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    # Path style works on MinIO, moto and AWS alike, and with bucket names that contain dots.
    addressing_style: Literal["auto", "path", "virtual"] = "path"
    # botocore's default pool (10) would throttle the dataset fetcher's parallel GETs.
    max_pool_connections: int = Field(32, ge=1)
    max_attempts: int = Field(5, ge=1)
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)

    @classmethod
    def from_env(cls, env: Mapping[str, str], prefix: str = "S3_") -> "S3Settings":
        """Read ``S3_ENDPOINT_URL``, ``S3_REGION``, ``S3_ACCESS_KEY_ID``, ... from ``env``.

        The mapping is passed in (usually ``os.environ`` at the process entry point) so nothing
        below the entry point reads the environment.
        """
        fields = {
            "endpoint_url": "ENDPOINT_URL",
            "region": "REGION",
            "access_key_id": "ACCESS_KEY_ID",
            "secret_access_key": "SECRET_ACCESS_KEY",
            "session_token": "SESSION_TOKEN",
            "addressing_style": "ADDRESSING_STYLE",
        }
        values = {name: env[prefix + var] for name, var in fields.items() if env.get(prefix + var)}
        return cls.model_validate(values)
