"""Images of any band count and bit depth, read as the 8-bit arrays training and prediction use.

- Band selection: ``bands`` (1-based, as GDAL numbers them) picks and orders the bands; without
  it an image must have exactly 3 bands (RGB), as before.
- Scaling: 8-bit images are taken as they are. Others (16-bit, float) are stretched linearly per
  band between two percentiles of that image (``scale.percentiles``, default 2 and 98), or
  between a fixed ``scale.range`` given for the whole dataset (which then applies to 8-bit images
  too), and rounded to 0-255. After that every image is what an 8-bit RGB PNG is, so the
  augmentation, the cache and the normalisation need no second path.

PNG and JPEG files with the default spec (RGB, no range) are decoded exactly as before, by
:func:`imageio.read_rgb`. TIFFs (GeoTIFFs among them) are read with rasterio, which also reads
them window by window for scenes larger than memory (:mod:`snunet_cbam.predict`).

Percentiles of a large scene come from a decimated read (at most :data:`STATS_SIDE` pixels on the
longest side), so computing them costs little memory whatever the scene; an image no larger than
that, such as a training tile, is read whole for them, so a tile gets the same stretch whether
training reads it or ``cdtrain predict`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .imageio import read_rgb

TIFF_SUFFIXES = (".tif", ".tiff")
STATS_SIDE = 1024  # longest side of the read that percentiles are computed from


class ImageBandsError(ValueError):
    """An image whose bands do not fit the configuration (too few, or not 3 without ``bands``)."""


@dataclass(frozen=True)
class ImageSpec:
    """Which bands to read and how to bring them to 0-255 (the config keys ``bands``, ``scale``)."""

    bands: tuple[int, ...] | None = None
    percentiles: tuple[float, float] = (2.0, 98.0)
    range: tuple[float, float] | None = None

    @classmethod
    def from_config(cls, config: Any) -> "ImageSpec":
        scale = config.scale
        return cls(bands=tuple(config.bands) if config.bands else None,
                   percentiles=(float(scale.percentiles[0]), float(scale.percentiles[1])),
                   range=(float(scale.range[0]), float(scale.range[1])) if scale.range is not None else None)

    @property
    def channels(self) -> int:
        return len(self.bands) if self.bands else 3

    @property
    def plain_rgb(self) -> bool:
        """RGB as stored, no fixed range: PNG and JPEG are then decoded as they always were."""
        return self.bands is None and self.range is None

    def indexes(self, count: int, path: Path | str) -> list[int]:
        """The 1-based band indexes to read from an image with ``count`` bands."""
        problem = self.band_problem(count)
        if problem:
            raise ImageBandsError(f"{path}: {problem}")
        return list(self.bands) if self.bands else [1, 2, 3]

    def band_problem(self, count: int) -> str | None:
        if self.bands:
            missing = [b for b in self.bands if b > count]
            if missing:
                return (f"has {count} band(s), but bands {list(self.bands)} asks for band "
                        f"{', '.join(map(str, missing))}")
            return None
        if count != 3:
            return f"has {count} band(s), expected 3 (RGB); choose bands with the config key bands, e.g. [3, 2, 1]"
        return None


DEFAULT_SPEC = ImageSpec()


def is_tiff(path: Path | str) -> bool:
    return Path(path).suffix.lower() in TIFF_SUFFIXES


def stretch_limits(sample: np.ndarray, spec: ImageSpec, nodata: float | None = None) -> np.ndarray | None:
    """``(C, 2)`` low/high per band of ``sample`` (``(C, H, W)``), or None for 8-bit data taken as is."""
    channels = sample.shape[0]
    if spec.range is not None:
        return np.tile(np.asarray(spec.range, dtype=np.float64), (channels, 1))
    if sample.dtype == np.uint8:
        return None
    limits = np.zeros((channels, 2), dtype=np.float64)
    for c in range(channels):
        band = sample[c].astype(np.float64).ravel()
        valid = band[np.isfinite(band) & ((band != nodata) if nodata is not None else True)]
        if valid.size:
            limits[c] = np.percentile(valid, spec.percentiles)
    return limits


def apply_stretch(raw: np.ndarray, limits: np.ndarray | None) -> np.ndarray:
    """``(C, H, W)`` of any dtype -> ``(H, W, C)`` uint8."""
    if limits is None:
        return np.ascontiguousarray(raw.transpose(1, 2, 0))
    low = limits[:, 0].reshape(-1, 1, 1)
    # A constant band (high == low) maps to 0, not to a division by zero.
    span = np.maximum(limits[:, 1] - limits[:, 0], 1e-12).reshape(-1, 1, 1)
    scaled = (raw.astype(np.float32) - low.astype(np.float32)) * (255.0 / span.astype(np.float32))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.ascontiguousarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def scene_limits(src: Any, indexes: list[int], spec: ImageSpec) -> np.ndarray | None:
    """Stretch limits of an open rasterio dataset, from a read of at most STATS_SIDE² pixels."""
    if spec.range is None and all(dt == "uint8" for dt in (src.dtypes[i - 1] for i in indexes)):
        return None
    factor = max(1.0, max(src.height, src.width) / STATS_SIDE)
    if factor == 1.0:
        sample = src.read(indexes)
    else:
        from rasterio.enums import Resampling

        shape = (len(indexes), max(1, int(src.height / factor)), max(1, int(src.width / factor)))
        sample = src.read(indexes, out_shape=shape, resampling=Resampling.nearest)
    return stretch_limits(sample, spec, src.nodata)


def read_image(path: Path | str, spec: ImageSpec = DEFAULT_SPEC) -> np.ndarray:
    """The image as ``(H, W, C)`` uint8, C = ``spec.channels``."""
    path = Path(path)
    if is_tiff(path):
        import rasterio

        with rasterio.open(path) as src:
            indexes = spec.indexes(src.count, path)
            limits = scene_limits(src, indexes, spec)
            return apply_stretch(src.read(indexes), limits)
    if spec.plain_rgb:
        return read_rgb(path)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise OSError(f"cannot decode image {path}")
    if raw.ndim == 2:
        raw = raw[..., None]
    elif raw.shape[2] in (3, 4):
        # cv2 decodes BGR(A); bands are numbered as stored, R = 1.
        raw = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB if raw.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    chw = raw.transpose(2, 0, 1)
    chw = chw[[i - 1 for i in spec.indexes(chw.shape[0], path)]]
    return apply_stretch(chw, stretch_limits(chw, spec))


def image_header(path: Path | str) -> tuple[int, int, int, str]:
    """``(width, height, bands, dtype)`` of a TIFF from its header (rasterio)."""
    import rasterio

    with rasterio.open(path) as src:
        return src.width, src.height, src.count, str(src.dtypes[0])
