"""Crop windows that may be rotated, cut with one ``cv2.warpAffine`` from the whole image.

A window is a ``size``×``size`` square turned by ``angle`` degrees about its centre. Rotating the
image first and cropping inside it means every output pixel is real image content: nothing is
reflected or filled. Only ``size``² pixels are computed, however large the image.

Coordinates are pixel centres (pixel ``(0, 0)`` spans ``[-0.5, 0.5]``). A square turned by θ has a
half-extent of ``size/2 · (|cos θ| + |sin θ|)`` along each image axis, so it fits when
``size · (|cos θ| + |sin θ|) <= min(height, width)``. Where the image is too small for the drawn
angle, the angle is clamped to the nearest one that fits (see :func:`fit_angle`): an image exactly
``size`` wide gets multiples of 90° only, which are lossless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# Kept free around a rotated window: cv2 quantises sample positions to 1/32 pixel, and a sample
# rounded past the last pixel would blend in border content.
_MARGIN = 0.05


@dataclass(frozen=True)
class Window:
    """A crop square: its centre ``(cx, cy)`` in pixel coordinates and its angle in degrees."""

    cx: float
    cy: float
    size: int
    angle: float = 0.0

    @property
    def quarter_turns(self) -> int | None:
        """k when the angle is k·90° (cut exactly by slicing), else None."""
        k = self.angle / 90.0
        return int(round(k)) % 4 if k == round(k) else None


def max_fitting_angle(height: int, width: int, size: int) -> float:
    """The largest residual angle (0-45°, beyond a multiple of 90°) at which the window fits."""
    ratio = (min(height, width) - 2 * _MARGIN) / size
    if ratio >= math.sqrt(2):
        return 45.0
    if ratio <= 1.0:
        return 0.0
    # |cos φ| + |sin φ| = √2·cos(φ - 45°) <= ratio  ⇔  φ <= 45° - acos(ratio / √2).
    return math.degrees(math.pi / 4 - math.acos(ratio / math.sqrt(2)))


def fit_angle(angle: float, height: int, width: int, size: int) -> float:
    """``angle`` if the window fits at it, else the nearest angle that fits.

    A square turned by 90° covers the same ground, so only the residual beyond the nearest
    multiple of 90° is limited: 200° in a tile barely larger than the crop becomes 180° ± a little.
    """
    quarter = round(angle / 90.0) * 90.0
    limit = max_fitting_angle(height, width, size)
    return quarter + float(np.clip(angle - quarter, -limit, limit))


def draw_window(rng: np.random.Generator, height: int, width: int, size: int, angle: float) -> Window:
    """A uniformly placed window at ``angle`` (already fitted) lying wholly inside the image."""
    if angle / 90.0 == round(angle / 90.0):
        # Axis-aligned: whole-pixel offsets, so the cut is an exact slice with no interpolation.
        x0 = int(rng.integers(0, width - size + 1))
        y0 = int(rng.integers(0, height - size + 1))
        return Window(x0 + (size - 1) / 2, y0 + (size - 1) / 2, size, angle)
    theta = math.radians(angle)
    extent = size / 2 * (abs(math.cos(theta)) + abs(math.sin(theta))) + _MARGIN
    cx = rng.uniform(extent - 0.5, width - 0.5 - extent)
    cy = rng.uniform(extent - 0.5, height - 0.5 - extent)
    return Window(cx, cy, size, angle)


def cut(image: np.ndarray, window: Window, interpolation: int, border_mode: int = cv2.BORDER_REFLECT_101,
        border_value: float = 0) -> np.ndarray:
    """The window's pixels, upright (``size``×``size``). ``border_mode`` only matters for a window
    that does not fit, which :func:`draw_window` never returns."""
    size, turns = window.size, window.quarter_turns
    if turns is not None:
        x0 = int(round(window.cx - (size - 1) / 2))
        y0 = int(round(window.cy - (size - 1) / 2))
        return quarter_turn(image[y0 : y0 + size, x0 : x0 + size], turns)
    theta = math.radians(window.angle)
    c, s, mid = math.cos(theta), math.sin(theta), (size - 1) / 2
    # Inverse map, output → source: source = R(θ)·(output - mid) + centre.
    matrix = np.array([[c, -s, window.cx - c * mid + s * mid],
                       [s, c, window.cy - s * mid - c * mid]])
    return cv2.warpAffine(image, matrix, (size, size), flags=interpolation | cv2.WARP_INVERSE_MAP,
                          borderMode=border_mode, borderValue=_scalar(border_value))


def quarter_turn(image: np.ndarray, turns: int) -> np.ndarray:
    """A copy turned by ``turns`` × 90° counter-clockwise (as ``np.rot90``). cv2 instead of
    ``np.ascontiguousarray(np.rot90(...))``, which is ten times slower on a 3-channel crop."""
    turns %= 4
    if turns == 0:
        return image.copy()  # never a view: the source may be the shared decoded-image cache
    if image.ndim == 3 and image.shape[2] > 4:  # cv2 turns at most 4 channels
        return np.ascontiguousarray(np.rot90(image, turns))
    return cv2.rotate(image, _CV2_TURNS[turns])


_CV2_TURNS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def rotate_in_place(image: np.ndarray, angle: float, interpolation: int, border_mode: int,
                    border_value: float = 0) -> np.ndarray:
    """Turn an image about its centre, keeping its size; the corners come from ``border_mode``.

    This is the crop-then-rotate pipeline (``rotate_before_crop: false``), kept for comparison.
    """
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    return cv2.warpAffine(image, matrix, (w, h), flags=interpolation, borderMode=border_mode,
                          borderValue=_scalar(border_value))


def pad_to(image: np.ndarray, size: int, border_mode: int, border_value: float = 0) -> np.ndarray:
    """Pad (centred) to at least ``size`` on each side; images smaller than the crop only."""
    h, w = image.shape[:2]
    dy, dx = max(0, size - h), max(0, size - w)
    if not dy and not dx:
        return image
    return cv2.copyMakeBorder(image, dy // 2, dy - dy // 2, dx // 2, dx - dx // 2, border_mode,
                              value=_scalar(border_value))


def _scalar(value: float) -> tuple[float, float, float, float]:
    return (value, value, value, value)
