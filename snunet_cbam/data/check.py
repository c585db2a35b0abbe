"""The dataset check run before training: every bad pair, named, with the reason.

It reads headers and verifies each file's integrity with Pillow (no full decode of the images), so
checking the whole of LEVIR-CD costs seconds, not a training epoch. Labels are decoded (one cheap,
well-compressed channel) to refuse those whose values would all read as "no change" under
``label_threshold`` (a 0/1 mask with the default 128): see :mod:`imageio`.

An image whose header gives more than ``max_image_pixels`` pixels is never decoded, here or later:
the whole dataset is refused (:class:`ImageTooLargeError`), whatever ``skip_invalid`` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .geotiff import DEFAULT_SPEC, ImageSpec, image_header, is_tiff
from .imageio import DEFAULT_LABEL_THRESHOLD, label_problem, read_label_values
from .layouts import PairPaths

_RGB_MODES = {"RGB"}
_MASK_MODES = {"1", "L", "P", "I", "I;16", "RGB"}
# One image's width x height. 2**27 (e.g. 11585²) is 384 MiB decoded as RGB, before the copies
# and float tensors made of it; LEVIR-CD's 1024² is 1 Mpx. Below Pillow's own hard refusal
# (2 x Image.MAX_IMAGE_PIXELS, 178,956,970 by default) so that this limit's reason is the one given.
DEFAULT_MAX_IMAGE_PIXELS = 2**27


@dataclass(frozen=True)
class PairProblem:
    name: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.name}: " + "; ".join(self.reasons)


@dataclass
class DatasetReport:
    split: str
    valid: list[PairPaths] = field(default_factory=list)
    problems: list[PairProblem] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    oversized: list[str] = field(default_factory=list)  # pairs with an image over the pixel limit

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        lines = [f"split '{self.split}': {len(self.valid)} valid pair(s), {len(self.problems)} invalid"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


_INVALID_PAIRS = "the dataset has invalid pairs; fix them or set skip_invalid: true to skip them"


class InvalidDatasetError(ValueError):
    def __init__(self, reports: list[DatasetReport], headline: str = _INVALID_PAIRS) -> None:
        self.reports = reports
        body = "\n".join(r.describe() for r in reports if not r.ok)
        super().__init__(f"{headline}\n{body}")


class ImageTooLargeError(InvalidDatasetError):
    """Images over the pixel limit: the dataset is refused whole, ``skip_invalid`` or not."""

    def __init__(self, reports: list[DatasetReport], max_pixels: int | None) -> None:
        limit = f"the limit of {max_pixels:,} pixels" if max_pixels is not None else "what Pillow opens"
        super().__init__(reports, (
            f"the dataset has images over {limit} (CDTRAIN_MAX_IMAGE_PIXELS on the workers), too large to "
            "decode safely; the dataset is refused whole (skip_invalid does not skip them): cut the images "
            "into tiles or raise the limit"))


def _over_limit(size: tuple[int, int], role: str, max_pixels: int | None, reasons: list[str],
                oversized: list[str] | None) -> bool:
    if max_pixels is None or size[0] * size[1] <= max_pixels:
        return False
    reasons.append(f"{role} is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, over the limit "
                   f"of {max_pixels:,} pixels (CDTRAIN_MAX_IMAGE_PIXELS)")
    if oversized is not None:
        oversized.append(role)
    return True


def _inspect_image(path: Path, role: str, spec: ImageSpec, reasons: list[str], max_pixels: int | None,
                   oversized: list[str]) -> tuple[int, int] | None:
    """An image of a pair: RGB PNG/JPEG as ever; TIFFs (rasterio's header) and images read with
    ``bands`` by their band count."""
    if spec.plain_rgb and not is_tiff(path):
        return _inspect(path, role, _RGB_MODES, reasons, max_pixels, oversized)
    if not path.exists():
        reasons.append(f"missing {role} ({path.name})")
        return None
    try:
        if is_tiff(path):
            width, height, count, _ = image_header(path)
        else:
            with Image.open(path) as im:
                (width, height), count = im.size, len(im.getbands())
                if max_pixels is None or width * height <= max_pixels:  # never decode an oversized one
                    im.verify()
    except Image.DecompressionBombError as exc:
        reasons.append(f"{role} is larger than Pillow opens ({exc})")
        oversized.append(role)
        return None
    except Exception as exc:  # rasterio and Pillow raise many types for corrupt files
        reasons.append(f"unreadable {role} ({type(exc).__name__}: {exc})")
        return None
    if _over_limit((width, height), role, max_pixels, reasons, oversized):
        return None
    problem = spec.band_problem(count)
    if problem:
        reasons.append(f"{role} {problem}")
    return width, height


def _inspect(path: Path, role: str, allowed_modes: set[str], reasons: list[str],
             max_pixels: int | None = None, oversized: list[str] | None = None) -> tuple[int, int] | None:
    if not path.exists():
        reasons.append(f"missing {role} ({path.name})")
        return None
    try:
        with Image.open(path) as im:  # the header only: Pillow decodes on demand
            size, mode = im.size, im.mode
            if _over_limit(size, role, max_pixels, reasons, oversized):
                return None
            im.verify()
    except Image.DecompressionBombError as exc:
        # Pillow's own hard limit (2 x its global Image.MAX_IMAGE_PIXELS, read, never set here)
        # refused the header before max_pixels could be applied: too large either way.
        reasons.append(f"{role} is larger than Pillow opens ({exc})")
        if oversized is not None:
            oversized.append(role)
        return None
    except Exception as exc:  # Pillow raises many types for corrupt files
        reasons.append(f"unreadable {role} ({type(exc).__name__}: {exc})")
        return None
    if mode not in allowed_modes:
        channels = len(Image.new(mode, (1, 1)).getbands()) if mode else "?"
        expected = "3 (RGB)" if role.startswith("image") else "1"
        reasons.append(f"{role} has {channels} channels (mode {mode}), expected {expected}")
    return size


def _check_label_values(path: Path, threshold: int, reasons: list[str]) -> None:
    try:
        problem = label_problem(read_label_values(path), threshold, path)
    except OSError as exc:
        problem = f"unreadable label ({exc})"
    if problem:
        reasons.append(problem)


def check_pairs(pairs: list[PairPaths], split: str, *, label_threshold: int = DEFAULT_LABEL_THRESHOLD,
                max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                image_spec: ImageSpec = DEFAULT_SPEC) -> DatasetReport:
    """The report of ``split``; raises :class:`ImageTooLargeError` (with the report) when an image
    is over ``max_image_pixels`` (None: only Pillow's own limit). ``image_spec``: the bands the
    images must have (the config's ``bands``; RGB by default)."""
    report = DatasetReport(split=split)
    for pair in pairs:
        reasons: list[str] = []
        oversized: list[str] = []
        size_a = _inspect_image(pair.image_a, "image A", image_spec, reasons, max_image_pixels, oversized)
        size_b = _inspect_image(pair.image_b, "image B", image_spec, reasons, max_image_pixels, oversized)
        size_l = None
        if pair.label is None:
            reasons.append("missing label")
        else:
            before = len(reasons)
            size_l = _inspect(pair.label, "label", _MASK_MODES, reasons, max_image_pixels, oversized)
            if len(reasons) == before:  # decode only a label whose header passed
                _check_label_values(pair.label, label_threshold, reasons)
        found = {k: v for k, v in (("A", size_a), ("B", size_b), ("label", size_l)) if v is not None}
        if len(set(found.values())) > 1:
            reasons.append(
                "size mismatch: " + ", ".join(f"{k} {w}x{h}" for k, (w, h) in found.items())
            )
        if reasons:
            report.problems.append(PairProblem(pair.name, tuple(reasons)))
            if oversized:
                report.oversized.append(pair.name)
        else:
            report.valid.append(pair)
            report.sizes[pair.name] = size_a  # type: ignore[assignment]
    if report.oversized:
        # Refused whole rather than skipped: such an image is not a broken pair but data this
        # machine is not sized for (scenes meant to be tiled, or a bomb), and decoding it would
        # exhaust the worker's memory. Skipping would train quietly on what is left and rely on
        # every later reader (loaders, the registry's scoring) to honour the skip; the refusal
        # puts the limit and its variable in front of a person instead.
        raise ImageTooLargeError([report], max_image_pixels)
    return report
