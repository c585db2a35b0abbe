"""Paired augmentation: geometry shared by both dates and the mask, photometry per date.

The order, for one training sample:

1. **Rotated crop** (``rotate_before_crop: true``, :mod:`rotated_crop`): an angle θ (uniform in
   ±``rotate_limit`` with probability ``rotate_prob``, else 0) and a crop centre such that the
   whole turned ``crop_size`` square lies inside the image; the crop is cut with one warp from
   the whole image, so no pixel is reflected. Where the image cannot hold a square turned by θ,
   θ is limited to the nearest angle that fits (only multiples of 90° when the image is exactly
   the crop size). Images smaller than the crop are first padded by reflection, as before.
   With ``rotate_before_crop: false`` the old order is kept for comparison: an axis-aligned crop,
   then the rotation by θ inside it with reflected corners.
2. **Change-aware crop** (``crop_max_class_ratio``, open-cd's ``cat_max_ratio``): the crop's
   position is re-drawn, up to 10 tries, while one class (change or no change) covers more than
   this fraction of its mask; the last try is kept (always, on a tile with no change at all).
3. Rotation by a random multiple of 90° and flips.
4. **Date swap** (``swap_prob``, open-cd's ``ExchangeTime``): the two images change places; the
   mask ("changed between the dates") is the same either way.
5. Photometry (colour jitter, Gaussian blur, albumentations) on the images only, each date drawing
   its own, because real pairs differ in season, sun and sensor.

Every sample's randomness comes from seeds derived from ``(seed, epoch, index)``
(:func:`sample_seeds`): ``seeds[0]`` drives steps 1-4, ``seeds[1]`` and ``seeds[2]`` the
photometry of each date. The same sample is augmented the same way whatever the worker count, and
a resumed run replays exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

from .rotated_crop import Window, cut, draw_window, fit_angle, pad_to, quarter_turn, rotate_in_place

CROP_TRIES = 10


@dataclass(frozen=True)
class AugmentParams:
    """Fields are named as the config keys they come from (the trainer fills them by name)."""

    crop_size: int
    rotate_before_crop: bool = True
    crop_max_class_ratio: float = 0.75
    rotate_limit: float = 180.0
    rotate_prob: float = 0.5
    rotate90_prob: float = 0.5
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    swap_prob: float = 0.0
    color_jitter_prob: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    blur_prob: float = 0.2
    blur_sigma_max: float = 1.5


def sample_seeds(seed: int, epoch: int, index: int, count: int = 3) -> list[int]:
    return [int(s) for s in np.random.SeedSequence([seed, epoch, index]).generate_state(count)]


class PairedAugmentation:
    """``border_mode``/``border_value`` fill whatever lies outside the image (padding of small
    images, the corners of the old crop-then-rotate order). Training uses reflection; a constant
    sentinel lets tests count out-of-image pixels."""

    def __init__(self, params: AugmentParams, *, border_mode: int = cv2.BORDER_REFLECT_101,
                 border_value: float = 0) -> None:
        self.params = params
        self.border_mode = border_mode
        self.border_value = border_value
        p = params
        blur = A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, p.blur_sigma_max), p=p.blur_prob)
        self.photometric = A.Compose(
            [
                A.ColorJitter(brightness=p.brightness, contrast=p.contrast, saturation=p.saturation,
                              hue=p.hue, p=p.color_jitter_prob),
                blur,
            ]
        )
        # Saturation and hue mean nothing without RGB: other band counts (multispectral, 4-band
        # RGBN) get brightness and contrast only, with the same limits and probability.
        self.photometric_bands = A.Compose(
            [
                A.RandomBrightnessContrast(brightness_limit=p.brightness, contrast_limit=p.contrast,
                                           p=p.color_jitter_prob),
                A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, p.blur_sigma_max), p=p.blur_prob),
            ]
        )

    def __call__(self, image_a: np.ndarray, image_b: np.ndarray, mask: np.ndarray,
                 seeds: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b, m = self.geometry(image_a, image_b, mask, np.random.default_rng(seeds[0]))
        rgb = image_a.ndim == 3 and image_a.shape[2] == 3
        photometric = self.photometric if rgb else self.photometric_bands
        photometric.set_random_seed(seeds[1])
        a = photometric(image=a)["image"]
        photometric.set_random_seed(seeds[2])
        b = photometric(image=b)["image"]
        return a, b, m

    def geometry(self, image_a: np.ndarray, image_b: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps 1-4 of the module docstring, all drawn from ``rng``."""
        p = self.params
        image_a, image_b, mask = (pad_to(x, p.crop_size, self.border_mode, self.border_value)
                                  for x in (image_a, image_b, mask))
        angle = float(rng.uniform(-p.rotate_limit, p.rotate_limit)) if rng.random() < p.rotate_prob else 0.0
        h, w = mask.shape[:2]
        crop_angle = fit_angle(angle, h, w, p.crop_size) if p.rotate_before_crop else 0.0
        window, m = self._change_aware_window(mask, crop_angle, rng)
        a, b = (self._cut(x, window, cv2.INTER_LINEAR) for x in (image_a, image_b))
        if not p.rotate_before_crop and angle:
            a, b = (rotate_in_place(x, angle, cv2.INTER_LINEAR, self.border_mode, self.border_value)
                    for x in (a, b))
            m = rotate_in_place(m, angle, cv2.INTER_NEAREST, self.border_mode, self.border_value)
        if rng.random() < p.rotate90_prob:
            turns = int(rng.integers(0, 4))
            a, b, m = (quarter_turn(x, turns) for x in (a, b, m))
        hflip, vflip = rng.random() < p.hflip_prob, rng.random() < p.vflip_prob
        if hflip or vflip:
            # cv2.flip's code: 1 = about the vertical axis, 0 = horizontal axis, -1 = both.
            code = -1 if hflip and vflip else (1 if hflip else 0)
            a, b, m = (cv2.flip(x, code) for x in (a, b, m))
        if rng.random() < p.swap_prob:
            a, b = b, a
        return a, b, m

    def _change_aware_window(self, mask: np.ndarray, angle: float,
                             rng: np.random.Generator) -> tuple[Window, np.ndarray]:
        """Re-draw the position while one class covers more than ``crop_max_class_ratio``."""
        h, w = mask.shape[:2]
        ratio = self.params.crop_max_class_ratio
        for _ in range(CROP_TRIES):
            window = draw_window(rng, h, w, self.params.crop_size, angle)
            m = self._cut(mask, window, cv2.INTER_NEAREST)
            if ratio >= 1.0:
                break
            change = np.count_nonzero(m) / m.size
            if max(change, 1.0 - change) <= ratio:
                break
        return window, m

    def _cut(self, image: np.ndarray, window: Window, interpolation: int) -> np.ndarray:
        return cut(image, window, interpolation, self.border_mode, self.border_value)
