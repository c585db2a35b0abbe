"""Safe extraction of a dataset archive (.zip, .tar.gz, .tgz) into an empty directory.

Every member path is checked before anything is written, links are created last and verified
against the real filesystem, special files are refused, and the expanded size and the member
count are capped (declared sizes first, then what is really written, since headers can lie).
Blocking: callers run :func:`extract_archive` in a thread.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

from schemas.jobs import ARCHIVE_SUFFIXES  # one definition: the request model uses it too

__all__ = ["ArchiveError", "ArchiveLimitError", "ExtractedArchive", "archive_suffix", "extract_archive"]

_CHUNK = 1 << 20
_MAX_LINK_TARGET = 4096
_IGNORED_TOP_LEVEL = {"__MACOSX"}  # macOS Finder's resource forks; never part of a dataset


class ArchiveError(Exception):
    """The archive cannot be extracted safely; the message says why."""


class ArchiveLimitError(ArchiveError):
    """Over a cap: ``measured`` is what was counted when it tripped (``at_least``: the archive
    holds at least that much, it was not read to the end)."""

    def __init__(self, limit: Literal["max_extracted_bytes", "max_archive_members"], measured: int, maximum: int,
                 *, at_least: bool, source: str) -> None:
        self.limit = limit
        self.measured = measured
        self.maximum = maximum
        self.at_least = at_least
        self.source = source
        unit = "bytes" if limit == "max_extracted_bytes" else "members"
        super().__init__(f"archive {source} has {'at least ' if at_least else ''}{measured} {unit}, over the "
                         f"limit of {maximum} ({limit})")


@dataclass(frozen=True)
class ExtractedArchive:
    files: int  # regular files (hardlinks copied as files; symlinks not counted)
    bytes: int  # bytes written


def archive_suffix(key: str) -> str | None:
    """The archive suffix ``key`` ends with (case-insensitive), or None for anything else."""
    lowered = key.lower()
    return next((s for s in ARCHIVE_SUFFIXES if lowered.endswith(s)), None)


def extract_archive(archive: Path, suffix: str, dest: Path, *, max_bytes: int, max_members: int,
                    source: str) -> ExtractedArchive:
    """Extract ``archive`` (of type ``suffix``) into ``dest``, which must not exist yet.

    ``source`` names the archive in messages. Raises :class:`ArchiveError` (and
    :class:`ArchiveLimitError` past a cap); ``dest`` may then hold a partial tree, which the
    caller removes.
    """
    dest.mkdir()
    extractor = _Extractor(dest, _Limits(max_bytes=max_bytes, max_members=max_members), source)
    run: Callable[[Path, _Extractor], None] = _extract_zip if suffix == ".zip" else _extract_tar
    try:
        run(archive, extractor)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"archive {source} is corrupt or not a {suffix} file: {exc}") from None
    except NotImplementedError as exc:  # e.g. a zip compression method Python lacks
        raise ArchiveError(f"archive {source} uses an unsupported feature: {exc}") from None
    except OSError as exc:
        raise ArchiveError(f"could not extract archive {source}: {exc.strerror or exc} ({exc.filename})") from None
    extractor.finish()
    if not extractor.files:
        raise ArchiveError(f"archive {source} contains no files")
    return ExtractedArchive(files=len(extractor.files), bytes=extractor.bytes)


@dataclass(frozen=True)
class _Limits:
    max_bytes: int
    max_members: int


class _Extractor:
    """Writes members under ``root``; files and dirs first, links last (see ``finish``)."""

    def __init__(self, root: Path, limits: _Limits, source: str) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.limits = limits
        self.source = source
        self.members = 0
        self.files: set[PurePosixPath] = set()
        self.reserved = 0  # counted against max_bytes: declared sizes, or more if they lie
        self.bytes = 0  # actually written
        self.symlinks: list[tuple[str, PurePosixPath, str]] = []

    def member_path(self, name: str) -> PurePosixPath | None:
        """The checked relative path of a member, or None for members to skip."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveLimitError("max_archive_members", self.members, self.limits.max_members,
                                    at_least=True, source=self.source)
        return _safe_relative(name, what="archive member")

    def check_members(self, count: int) -> None:
        """The exact member count, where the format declares it up front (zip)."""
        if count > self.limits.max_members:
            raise ArchiveLimitError("max_archive_members", count, self.limits.max_members,
                                    at_least=False, source=self.source)

    def add_dir(self, rel: PurePosixPath) -> None:
        target = self.root / rel
        if target.is_file():
            raise ArchiveError(f"archive member '{rel}/' conflicts with a file of the same name")
        target.mkdir(parents=True, exist_ok=True)

    def add_file(self, name: str, rel: PurePosixPath, reader: BinaryIO, declared_size: int) -> None:
        self.reserve(declared_size)
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        try:
            with open(target, "wb") as writer:
                while chunk := reader.read(_CHUNK):
                    written += len(chunk)
                    if written > declared_size:
                        # The header lied (a classic bomb trick): count what really arrives.
                        self.reserve(len(chunk))
                    writer.write(chunk)
        except IsADirectoryError:
            raise ArchiveError(f"archive member '{name}' conflicts with a directory of the same name") from None
        self.bytes += written
        self.files.add(rel)

    def add_hardlink(self, name: str, rel: PurePosixPath, link_name: str) -> None:
        try:
            source = _safe_relative(link_name, what="link target")
        except ArchiveError:
            raise ArchiveError(
                f"archive member '{name}' is a hardlink pointing outside the extraction directory "
                f"('{link_name}')"
            ) from None
        if source is None or source == rel or source not in self.files:
            raise ArchiveError(
                f"archive member '{name}' is a hardlink to '{link_name}', which is not a file "
                "earlier in the archive"
            )
        # Copy rather than link: the cache must not share inodes with anything else.
        with open(self.root / source, "rb") as reader:
            self.add_file(name, rel, reader, (self.root / source).stat().st_size)

    def add_symlink(self, name: str, rel: PurePosixPath, target: str) -> None:
        if not target:
            raise ArchiveError(f"archive member '{name}' is a symlink with an empty target")
        if _is_absolute(target):
            raise ArchiveError(
                f"archive member '{name}' is a symlink to an absolute path ('{target}'); only "
                "relative links inside the archive are allowed"
            )
        lexical = os.path.normpath(os.path.join(str(rel.parent), target))
        if lexical == ".." or lexical.startswith("../"):
            raise _symlink_escape(name, target)
        self.symlinks.append((name, rel, target))

    def finish(self) -> None:
        """Create the symlinks, then check each one against the real filesystem.

        Links are made after every file so no write can go through one; the final check uses
        realpath because chains of individually harmless links can still climb out.
        """
        for name, rel, target in self.symlinks:
            parent = self.root / rel.parent
            if not self._inside(os.path.realpath(parent)):
                raise _symlink_escape(name, target)
            parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(target, self.root / rel)
            except FileExistsError:
                raise ArchiveError(f"archive member '{name}' conflicts with another member of the same name") from None
        for name, rel, target in self.symlinks:
            if not self._inside(os.path.realpath(self.root / rel)):
                raise _symlink_escape(name, target)

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def reserve(self, size: int) -> None:
        self.reserved += size
        self.check_total(self.reserved, at_least=True)

    def check_total(self, total: int, *, at_least: bool) -> None:
        if total > self.limits.max_bytes:
            raise ArchiveLimitError("max_extracted_bytes", total, self.limits.max_bytes,
                                    at_least=at_least, source=self.source)


def _symlink_escape(name: str, target: str) -> ArchiveError:
    return ArchiveError(
        f"archive member '{name}' is a symlink pointing outside the extraction directory ('{target}')"
    )


def _safe_relative(name: str, *, what: str) -> PurePosixPath | None:
    normalised = name.replace("\\", "/")  # Windows tools sometimes write backslashes
    if "\x00" in name:
        raise ArchiveError(f"{what} {name!r} contains a NUL byte")
    if _is_absolute(normalised):
        raise ArchiveError(
            f"{what} '{name}' has an absolute path — archives must hold relative paths"
        )
    parts = [p for p in normalised.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{what} '{name}' escapes the extraction directory ('..' in its path)")
    if not parts or parts[0] in _IGNORED_TOP_LEVEL:
        return None
    return PurePosixPath(*parts)


def _is_absolute(path: str) -> bool:
    normalised = path.replace("\\", "/")
    return normalised.startswith("/") or re.match(r"^[A-Za-z]:/", normalised) is not None


def _extract_zip(archive: Path, extractor: _Extractor) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # Fail fast on the central directory's count and declared total, before writing
        # anything; add_file still counts the real bytes in case the headers lie.
        extractor.check_members(len(infos))
        extractor.check_total(sum(i.file_size for i in infos), at_least=False)
        for info in infos:
            rel = extractor.member_path(info.filename)
            if rel is None:
                continue
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if info.is_dir() or kind == stat.S_IFDIR:
                extractor.add_dir(rel)
            elif kind == stat.S_IFLNK:
                if info.file_size > _MAX_LINK_TARGET:
                    raise ArchiveError(f"archive member '{info.filename}' is a symlink with an oversized target")
                extractor.add_symlink(info.filename, rel, zf.read(info).decode("utf-8", "replace"))
            elif kind not in (0, stat.S_IFREG):
                raise _special_file(info.filename)
            elif info.flag_bits & 0x1:
                raise ArchiveError(f"archive member '{info.filename}' is encrypted — upload an unencrypted archive")
            else:
                with zf.open(info) as reader:
                    extractor.add_file(info.filename, rel, reader, info.file_size)


def _extract_tar(archive: Path, extractor: _Extractor) -> None:
    # Stream mode ("r|*"): one sequential pass, no seeking through a gzip stream.
    with tarfile.open(archive, mode="r|*") as tf:
        for member in tf:
            rel = extractor.member_path(member.name)
            if rel is None:
                continue
            if member.isdir():
                extractor.add_dir(rel)
            elif member.isreg():
                reader = tf.extractfile(member)
                assert reader is not None
                extractor.add_file(member.name, rel, reader, member.size)
            elif member.issym():
                extractor.add_symlink(member.name, rel, member.linkname)
            elif member.islnk():
                extractor.add_hardlink(member.name, rel, member.linkname)
            else:
                raise _special_file(member.name)


def _special_file(name: str) -> ArchiveError:
    return ArchiveError(
        f"archive member '{name}' is a device or other special file; dataset archives may hold "
        "only files, directories and links"
    )
