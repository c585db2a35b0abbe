"""Paired augmentation with albumentations.

Geometry (random crop, 90-degree rotations, arbitrary rotation, flips) is drawn once and applied
to both dates and the mask, so they stay aligned. Photometry (colour jitter, Gaussian blur) touches
the images only, and each date draws its own, because real pairs differ in season, sun and sensor.

Every sample's randomness comes from a seed derived from ``(seed, epoch, index)``: the same
sample is augmented the same way whatever the worker count, and a resumed run replays exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentParams:
    crop_size: int
    rotate_limit: float = 180.0
    rotate_prob: float = 0.5
    rotate90_prob: float = 0.5
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
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
    def __init__(self, params: AugmentParams) -> None:
        self.params = params
        p = params
        self.geometric = A.Compose(
            [
                A.RandomCrop(height=p.crop_size, width=p.crop_size, pad_if_needed=True,
                             border_mode=cv2.BORDER_REFLECT_101),
                A.RandomRotate90(p=p.rotate90_prob),
                # Reflection instead of black corners: the mask is reflected too, so it stays true.
                A.Rotate(limit=p.rotate_limit, border_mode=cv2.BORDER_REFLECT_101, p=p.rotate_prob),
                A.HorizontalFlip(p=p.hflip_prob),
                A.VerticalFlip(p=p.vflip_prob),
            ],
            additional_targets={"image_b": "image"},
        )
        self.photometric = A.Compose(
            [
                A.ColorJitter(brightness=p.brightness, contrast=p.contrast, saturation=p.saturation,
                              hue=p.hue, p=p.color_jitter_prob),
                A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, p.blur_sigma_max), p=p.blur_prob),
            ]
        )

    def __call__(self, image_a: np.ndarray, image_b: np.ndarray, mask: np.ndarray,
                 seeds: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.geometric.set_random_seed(seeds[0])
        out = self.geometric(image=image_a, image_b=image_b, mask=mask)
        self.photometric.set_random_seed(seeds[1])
        a = self.photometric(image=out["image"])["image"]
        self.photometric.set_random_seed(seeds[2])
        b = self.photometric(image=out["image_b"])["image"]
        return a, b, out["mask"]
