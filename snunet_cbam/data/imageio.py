"""Reading image pairs and labels as numpy arrays (RGB uint8 images, 0/1 uint8 masks)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Decoding is done per sample inside DataLoader workers; one thread each avoids oversubscription.
cv2.setNumThreads(1)


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"cannot decode image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    """Labels are 0/255 (sometimes 0/1, sometimes RGB): anything above 0 is change."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise OSError(f"cannot decode label {path}")
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return (mask > 0).astype(np.uint8)
