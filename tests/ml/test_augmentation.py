import numpy as np
import pytest

from snunet_cbam.data.augment import AugmentParams, PairedAugmentation, sample_seeds


def _pattern(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mask of random blocks, painted white into both dates over a dark textured background."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, size - 20, 2)
        mask[y : y + rng.integers(6, 20), x : x + rng.integers(6, 20)] = 1
    background = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
    a = np.where(mask[..., None] == 1, 255, background).astype(np.uint8)
    b = np.where(mask[..., None] == 1, 230, background // 2).astype(np.uint8)
    return a, b, mask


def _heavy(**overrides) -> PairedAugmentation:
    params = dict(crop_size=64, rotate_limit=180, rotate_prob=1.0, rotate90_prob=1.0, hflip_prob=0.5,
                  vflip_prob=0.5, color_jitter_prob=0.0, blur_prob=0.0)
    params.update(overrides)
    return PairedAugmentation(AugmentParams(**params))


@pytest.mark.parametrize("index", range(12))
def test_geometry_keeps_both_dates_and_the_mask_aligned(index):
    a, b, mask = _pattern(seed=index)
    out_a, out_b, out_mask = _heavy()(a, b, mask, sample_seeds(7, 0, index))
    assert out_a.shape == (64, 64, 3) and out_mask.shape == (64, 64)
    interior = np.ones_like(out_mask, bool)
    interior[[0, -1], :] = interior[:, [0, -1]] = False  # interpolation softens the very border
    # Bright pixels in each date are exactly the mask, away from interpolated edges of blocks.
    bright_a = out_a.mean(axis=2) > 140
    bright_b = out_b.mean(axis=2) > 140
    agreement_a = (bright_a == out_mask.astype(bool))[interior].mean()
    agreement_b = (bright_b == out_mask.astype(bool))[interior].mean()
    assert agreement_a > 0.97 and agreement_b > 0.97
    assert set(np.unique(out_mask)) <= {0, 1}


def test_photometric_changes_images_but_not_the_mask_and_differs_per_date():
    a, b, mask = _pattern()
    aug = PairedAugmentation(AugmentParams(crop_size=96, rotate_prob=0, rotate90_prob=0, hflip_prob=0, vflip_prob=0,
                                           color_jitter_prob=1.0, brightness=0.4, contrast=0.4, blur_prob=1.0))
    # Identical dates in: any difference between them out comes from per-date photometry.
    out_a, out_b, out_mask = aug(a, a.copy(), mask, sample_seeds(1, 0, 0))
    assert np.array_equal(out_mask, mask)
    assert not np.array_equal(out_a, a)
    assert not np.array_equal(out_a, out_b)


def test_same_seed_same_sample_other_seed_other_sample():
    a, b, mask = _pattern()
    aug = _heavy(color_jitter_prob=0.5, blur_prob=0.5)
    first = aug(a, b, mask, sample_seeds(3, 1, 5))
    again = aug(a, b, mask, sample_seeds(3, 1, 5))
    other = aug(a, b, mask, sample_seeds(3, 2, 5))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))


def test_images_smaller_than_the_crop_are_padded():
    a, b, mask = _pattern(size=40)
    out_a, _, out_mask = _heavy(rotate_prob=0, rotate90_prob=0)(a, b, mask, sample_seeds(0, 0, 0))
    assert out_a.shape == (64, 64, 3) and out_mask.shape == (64, 64)


def _blobs(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(size // 2):
        y, x = rng.integers(0, size - 40, 2)
        mask[y : y + rng.integers(8, 40), x : x + rng.integers(8, 40)] = 1
    return mask


@pytest.mark.parametrize("rotate_before_crop", [True, False])
def test_an_image_equal_to_its_mask_stays_equal_to_it(rotate_before_crop):
    """Images interpolate bilinearly and the mask by nearest neighbour: they may differ only on the
    edges of blocks, so agreement far above chance means no shift or turn between them."""
    mask = _blobs(1024, seed=0)
    image = np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)
    aug = _heavy(crop_size=256, rotate_before_crop=rotate_before_crop, swap_prob=0.5)
    for index in range(20):
        a, b, m = aug(image, image, mask, sample_seeds(5, 0, index))
        assert 0 < m.mean() < 1
        for out in (a, b):
            assert ((out.mean(axis=2) > 127) == m.astype(bool)).mean() > 0.99


def test_change_aware_crops_find_a_small_change_more_often_and_stay_deterministic():
    mask = np.zeros((512, 512), np.uint8)
    mask[170:218, 300:348] = 1  # 48² of change in 512²: few random 64² crops touch it
    image = np.repeat(mask[..., None] * 200, 3, axis=2).astype(np.uint8)

    def with_change(ratio: float) -> float:
        aug = _heavy(crop_size=64, crop_max_class_ratio=ratio, rotate_prob=0.5)
        return np.mean([aug(image, image, mask, sample_seeds(1, 0, i))[2].any() for i in range(400)])

    plain, aware = with_change(1.0), with_change(0.75)
    assert plain < 0.15 and aware > 2 * plain and aware - plain > 0.08
    aug = _heavy(crop_size=64, crop_max_class_ratio=0.75)
    first = aug(image, image, mask, sample_seeds(4, 2, 9))
    again = aug(image, image, mask, sample_seeds(4, 2, 9))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))


def test_a_tile_without_change_keeps_the_last_of_its_tries():
    a, b, _ = _pattern(size=128)
    mask = np.zeros((128, 128), np.uint8)
    out_a, _, out_mask = _heavy(crop_max_class_ratio=0.75)(a, b, mask, sample_seeds(0, 0, 0))
    assert out_a.shape == (64, 64, 3) and not out_mask.any()


def test_dates_swap_with_swap_prob_and_the_mask_stays():
    a, b, mask = _pattern()
    still = dict(crop_size=96, rotate_prob=0, rotate90_prob=0, hflip_prob=0, vflip_prob=0, color_jitter_prob=0,
                 blur_prob=0)
    swapped = PairedAugmentation(AugmentParams(swap_prob=1.0, **still))(a, b, mask, sample_seeds(0, 0, 0))
    assert np.array_equal(swapped[0], b) and np.array_equal(swapped[1], a) and np.array_equal(swapped[2], mask)
    kept = PairedAugmentation(AugmentParams(swap_prob=0.0, **still))(a, b, mask, sample_seeds(0, 0, 0))
    assert np.array_equal(kept[0], a) and np.array_equal(kept[1], b)
    half = PairedAugmentation(AugmentParams(swap_prob=0.5, **still))
    rate = np.mean([np.array_equal(half(a, b, mask, sample_seeds(0, 0, i))[0], b) for i in range(200)])
    assert 0.35 < rate < 0.65
