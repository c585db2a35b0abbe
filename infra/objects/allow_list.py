"""Where jobs may read datasets and configs from: ``CDTRAIN_ALLOWED_URIS``.

    UriAllowList.parse("s3://datasets/teams/a/, s3://configs, file:///srv/data")
    UriAllowList.parse("*")            # anything the workers' credentials can read

An entry is a bucket (``s3://configs``), a prefix in a bucket (``s3://datasets/teams/a/``) or a
local directory. A URI is allowed when it lies under an entry, folder by folder: the entry
``s3://b/teams/a`` covers ``s3://b/teams/a/x.zip`` but not ``s3://b/teams/ab/``. URIs with ``.``
or ``..`` folders are refused outright: some S3 endpoints and proxies normalise them, so what
the check sees would not be what the worker reads.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from infra.objects.uri import ObjectLocation, locate_object

__all__ = ["ANY", "UriAllowList"]

ANY = "*"


def _segments(location: ObjectLocation) -> tuple[str, ...]:
    # One namespace per store: a local path never matches a bucket entry of the same name.
    if location.store == "s3":
        path = f"{location.bucket}/{location.key}"
    else:
        path = f"{location.root_dir}/{location.bucket}/{location.key}"
    return (location.store, *(part for part in path.split("/") if part))


class UriAllowList(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    entries: tuple[str, ...] = ()
    allow_any: bool = False

    @classmethod
    def parse(cls, text: str) -> "UriAllowList":
        """Comma-separated entries; ``*`` alone allows everything. Raises ValueError naming a bad entry."""
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ValueError("no entries: give s3://bucket/prefix entries separated by commas, or '*'")
        if ANY in items:
            if len(items) > 1:
                raise ValueError("'*' allows everything and cannot be combined with other entries")
            return cls(allow_any=True)
        for item in items:
            try:
                cls._entry_segments(item)
            except ValueError as exc:
                raise ValueError(f"entry {item!r}: {exc}") from None
        return cls(entries=tuple(items))

    @staticmethod
    def _entry_segments(entry: str) -> tuple[str, ...]:
        location = locate_object(entry)
        if any(part in (".", "..") for part in location.key.split("/")):
            raise ValueError("'.' and '..' folders are not allowed")
        return _segments(location)

    def refusal(self, uri: str) -> str | None:
        """None when ``uri`` may be read; otherwise why not (without listing the entries)."""
        if self.allow_any:
            return None
        try:
            location = locate_object(uri)
        except ValueError as exc:
            return str(exc)
        if any(part in (".", "..") for part in location.key.split("/")):
            return "'.' and '..' folders are not allowed in a dataset or config location"
        wanted = _segments(location)
        for entry in self.entries:
            allowed = self._entry_segments(entry)
            if wanted[: len(allowed)] == allowed:
                return None
        return "not under a location this service may read (CDTRAIN_ALLOWED_URIS); ask its operator to allow it"

    def __str__(self) -> str:
        return ANY if self.allow_any else ", ".join(self.entries)
