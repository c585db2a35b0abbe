"""What one worker accepts of a job's inputs, and how much disk its dataset cache may keep.

The defaults stop abuse and accidents (a zip bomb, a prefix of millions of objects, a 50-gigapixel
scene), not real datasets: LEVIR-CD is about 3 GB in 637 pairs of 1024² images, and a big
change-detection dataset may be 100 GB. Each limit has one environment variable, read by
``cdtrain/settings.py``; a job past a limit ends FAILED with a message naming the measured size,
the limit and its variable (:func:`over_limit`).

Only pydantic here: the settings of every role import this module, the ingress's included.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

GIB = 2**30
MIB = 2**20

# Field -> the environment variable that sets it on the workers. One table for the settings and
# for the messages, so a message never names a variable that does not exist.
LIMIT_VARIABLES: dict[str, str] = {
    "max_archive_bytes": "CDTRAIN_MAX_ARCHIVE_BYTES",
    "max_extracted_bytes": "CDTRAIN_MAX_EXTRACTED_BYTES",
    "max_archive_members": "CDTRAIN_MAX_ARCHIVE_MEMBERS",
    "max_dataset_bytes": "CDTRAIN_MAX_DATASET_BYTES",
    "max_dataset_objects": "CDTRAIN_MAX_DATASET_OBJECTS",
    "max_config_bytes": "CDTRAIN_MAX_CONFIG_BYTES",
    "max_image_pixels": "CDTRAIN_MAX_IMAGE_PIXELS",
    "cache_max_bytes": "CDTRAIN_CACHE_MAX_BYTES",
}


class DatasetLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # One archive object, checked on its HEAD before the download and on what arrived.
    max_archive_bytes: int = Field(256 * GIB, ge=1)
    # What an archive expands to (declared sizes first, then the bytes really written) and how
    # many members it has: a bomb exhausts bytes, a million empty files exhaust inodes.
    max_extracted_bytes: int = Field(256 * GIB, ge=1)
    max_archive_members: int = Field(1_000_000, ge=1)
    # A prefix dataset, from its listing, before anything is downloaded.
    max_dataset_bytes: int = Field(256 * GIB, ge=1)
    max_dataset_objects: int = Field(1_000_000, ge=1)
    max_config_bytes: int = Field(1 * MIB, ge=1)
    # One image's width x height, read from its header before anything decodes it
    # (snunet_cbam.data.check). The same default as there; a literal so that the settings of the
    # ingress import no image library. 2**27 (e.g. 11585²) is 384 MiB as decoded RGB, and stays
    # under Pillow's own hard refusal (2 x Image.MAX_IMAGE_PIXELS, 178,956,970 by default), so it
    # is this limit and its message that a too-large image meets.
    max_image_pixels: int = Field(2**27, ge=1)
    # The worker's dataset cache, evicted least recently used first (consumer/dataset_cache.py).
    # The dataset in use is never evicted, even when it alone is larger.
    cache_max_bytes: int = Field(100 * GIB, ge=0)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "DatasetLimits":
        """The limits set in ``env`` (the rest default); ValueError naming the variable on a bad value."""
        values = {name: env[var] for name, var in LIMIT_VARIABLES.items() if env.get(var, "") != ""}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = [f"{LIMIT_VARIABLES.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()]
            raise ValueError("invalid worker limit: " + "; ".join(problems)) from None


def over_limit(field: str, subject: str, measured: str, limit: str, advice: str) -> str:
    """``subject measured, over the limit of limit (VARIABLE on the workers); advice``."""
    return f"{subject} {measured}, over the limit of {limit} ({LIMIT_VARIABLES[field]} on the workers); {advice}"


def format_bytes(size: int) -> str:
    """``1,234,567 bytes (1.2 MiB)``: exact for the log, readable for a person."""
    for unit, scale in (("TiB", 2**40), ("GiB", GIB), ("MiB", MIB), ("KiB", 2**10)):
        if size >= scale:
            return f"{size:,} bytes ({size / scale:.1f} {unit})"
    return f"{size:,} bytes"
