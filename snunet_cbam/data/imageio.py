"""Reading image pairs and labels as numpy arrays (RGB uint8 images, 0/1 uint8 masks).

Labels are 0 = no change and 255 = change; a pixel >= ``label_threshold`` (default 128) is change,
so JPEG noise around 0 and 255 binarises correctly. A label with non-zero values but none at or
above the threshold (a 0/1 mask, a class-index mask) would silently read as "no change"
everywhere, so it is refused with :class:`LabelValueError` instead.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Decoding is done per sample inside DataLoader workers; one thread each avoids oversubscription.
cv2.setNumThreads(1)

DEFAULT_LABEL_THRESHOLD = 128
_SHOWN_VALUES = 8


class LabelValueError(ValueError):
    """A label whose values would all read as "no change" under the threshold."""


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"cannot decode image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label_values(path: Path) -> np.ndarray:
    """The label's raw values, one channel (RGB labels are reduced by max)."""
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise OSError(f"cannot decode label {path}")
    return label.max(axis=2) if label.ndim == 3 else label


def label_problem(values: np.ndarray, threshold: int, path: Path | str) -> str | None:
    """Why this label cannot be binarised at ``threshold``, or None if it can."""
    top = int(values.max()) if values.size else 0
    if top == 0 or top >= threshold:
        return None  # all "no change", or holds change: both are fine
    found = np.flatnonzero(np.bincount(values.ravel())) if values.dtype == np.uint8 else np.unique(values)
    shown = ", ".join(str(int(v)) for v in found[:_SHOWN_VALUES]) + (", ..." if len(found) > _SHOWN_VALUES else "")
    return (f"label {path} has values {shown} but none >= label_threshold {threshold}, so it would read as "
            f"no change everywhere; expected 0 = no change and 255 = change; for 0/1 masks set "
            f"label_threshold: 1")


def read_mask(path: Path, threshold: int = DEFAULT_LABEL_THRESHOLD) -> np.ndarray:
    """The 0/1 change mask: pixels >= ``threshold`` are change."""
    values = read_label_values(path)
    problem = label_problem(values, threshold, path)
    if problem:
        raise LabelValueError(problem)
    return (values >= threshold).astype(np.uint8)
