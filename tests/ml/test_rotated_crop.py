"""Rotate-before-crop: every training pixel is real image content, none reflected or filled."""

import math

import cv2
import numpy as np
import pytest

from snunet_cbam.data.augment import AugmentParams, PairedAugmentation, sample_seeds
from snunet_cbam.data.rotated_crop import Window, cut, draw_window, fit_angle, max_fitting_angle


def _out_of_image_fraction(size: int, crop: int, rotate_before_crop: bool, samples: int) -> float:
    """An all-255 image and all-1 mask, with a constant 0 border: any pixel below 255 (or mask 0)
    came, wholly or in part, from outside the image."""
    image = np.full((size, size, 3), 255, np.uint8)
    mask = np.ones((size, size), np.uint8)
    params = AugmentParams(crop_size=crop, rotate_before_crop=rotate_before_crop, color_jitter_prob=0, blur_prob=0)
    aug = PairedAugmentation(params, border_mode=cv2.BORDER_CONSTANT, border_value=0)
    outside = total = 0
    for index in range(samples):
        a, b, m = aug(image, image, mask, sample_seeds(0, 0, index))
        assert a.shape == (crop, crop, 3) and m.shape == (crop, crop)
        marked = (a.min(axis=2) < 255) | (b.min(axis=2) < 255) | (m == 0)
        outside += int(np.count_nonzero(marked))
        total += marked.size
    return outside / total


@pytest.mark.parametrize("size, crop", [(1024, 256), (256, 128), (256, 256)])
def test_rotating_before_the_crop_samples_only_image_pixels(size, crop):
    assert _out_of_image_fraction(size, crop, rotate_before_crop=True, samples=200) == 0.0
    # The old order (crop, then rotate with filled corners): about 6% of pixels with rotate_prob 0.5.
    old = _out_of_image_fraction(size, crop, rotate_before_crop=False, samples=200)
    assert 0.03 < old < 0.10


def test_the_angle_is_limited_only_where_the_image_cannot_hold_the_turned_crop():
    assert max_fitting_angle(1024, 1024, 256) == 45.0  # any angle fits
    assert max_fitting_angle(256, 256, 128) == 45.0
    assert max_fitting_angle(256, 256, 256) == 0.0  # exactly the crop: multiples of 90° only
    limit = max_fitting_angle(300, 1024, 256)  # the short side decides
    assert 5 < limit < 20
    theta = math.radians(limit)
    assert 256 * (math.cos(theta) + math.sin(theta)) <= 300
    assert fit_angle(33.0, 1024, 1024, 256) == 33.0
    assert fit_angle(-170.0, 1024, 1024, 256) == -170.0
    assert fit_angle(33.0, 300, 300, 256) == pytest.approx(limit)
    assert fit_angle(100.0, 256, 256, 256) == 90.0
    assert fit_angle(-170.0, 256, 256, 256) == -180.0


def test_a_256_tile_cropped_at_256_is_only_turned_and_flipped_losslessly():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = (rng.random((256, 256)) < 0.5).astype(np.uint8)
    dihedral = [np.rot90(x, k) for k in range(4) for x in (image, image[:, ::-1])]
    aug = PairedAugmentation(AugmentParams(crop_size=256, rotate_prob=1.0, swap_prob=0, color_jitter_prob=0, blur_prob=0))
    for index in range(16):
        a, _, _ = aug(image, image, mask, sample_seeds(2, 0, index))
        assert any(np.array_equal(a, d) for d in dihedral)


@pytest.mark.parametrize("turns", range(4))
def test_quarter_turns_cut_by_slicing_match_the_warp(turns):
    """Multiples of 90° are cut exactly (slice and turn); the warp at a hair off agrees."""
    rng = np.random.default_rng(turns)
    image = rng.integers(0, 256, (200, 160, 3), dtype=np.uint8)
    exact = cut(image, Window(70.5, 90.5, 64, 90.0 * turns), cv2.INTER_NEAREST)
    warped = cut(image, Window(70.5, 90.5, 64, 90.0 * turns + 1e-6), cv2.INTER_NEAREST)
    assert np.array_equal(exact, warped)


def test_drawn_windows_lie_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        angle = fit_angle(float(rng.uniform(-180, 180)), 300, 500, 256)
        window = draw_window(rng, 300, 500, 256, angle)
        theta = math.radians(window.angle)
        half = 256 / 2 * (abs(math.cos(theta)) + abs(math.sin(theta)))
        assert half - 0.5 <= window.cx <= 500 - 0.5 - half + 1e-9
        assert half - 0.5 <= window.cy <= 300 - 0.5 - half + 1e-9
