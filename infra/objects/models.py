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
    def from_env(cls, env: Mapping[str, str]) -> "S3Settings":
        """``CDTRAIN_S3_ENDPOINT_URL`` (MinIO etc.; unset = AWS) and the standard ``AWS_*`` variables.

        The mapping is passed in (usually ``os.environ`` at the process entry point) so nothing
        below the entry point reads the environment. Unset credentials fall back to botocore's
        default chain (instance profile, IRSA, ~/.aws).
        """
        fields = {
            "endpoint_url": "CDTRAIN_S3_ENDPOINT_URL",
            "region": "AWS_DEFAULT_REGION",
            "access_key_id": "AWS_ACCESS_KEY_ID",
            "secret_access_key": "AWS_SECRET_ACCESS_KEY",
            "session_token": "AWS_SESSION_TOKEN",
            "addressing_style": "CDTRAIN_S3_ADDRESSING_STYLE",
        }
        values = {name: env[var] for name, var in fields.items() if env.get(var)}
        return cls.model_validate(values)
