"""Tests for snunet_cbam.synthetic: layout, formats, determinism and label semantics."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from snunet_cbam.synthetic import SyntheticDatasetSummary, make_synthetic_dataset

PAIRS = 32
SIZE = 128
SEED = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDatasetSummary:
    out = tmp_path_factory.mktemp("synthetic") / "ds"
    return make_synthetic_dataset(out, pairs=PAIRS, size=SIZE, seed=SEED)


def _names(root: Path, sub: str) -> set[str]:
    return {p.name for p in (root / sub).iterdir()}


def _read_list(root: Path, split: str) -> list[str]:
    return (root / "list" / f"{split}.txt").read_text().splitlines()


def _png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) straight from the IHDR chunk."""
    data = path.read_bytes()[:29]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def _load(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = cv2.imread(str(root / "A" / name), cv2.IMREAD_UNCHANGED)
    b = cv2.imread(str(root / "B" / name), cv2.IMREAD_UNCHANGED)
    label = cv2.imread(str(root / "label" / name), cv2.IMREAD_UNCHANGED)
    return a, b, label


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_lists_partition_all_names(dataset: SyntheticDatasetSummary) -> None:
    root = dataset.root
    names = _names(root, "A")
    assert len(names) == PAIRS
    assert _names(root, "B") == names
    assert _names(root, "label") == names
    assert all(re.fullmatch(r"pair_\d{4}\.png", n) for n in names)
    assert "pair_0000.png" in names and f"pair_{PAIRS - 1:04d}.png" in names

    lists = {split: _read_list(root, split) for split in ("train", "val", "test")}
    assert sorted(_names(root, "list")) == ["test.txt", "train.txt", "val.txt"]
    for split, entries in lists.items():
        assert entries, f"{split} is empty"
        assert len(entries) == len(set(entries)), f"duplicates in {split}"
    assert set(lists["train"]) & set(lists["val"]) == set()
    assert set(lists["train"]) & set(lists["test"]) == set()
    assert set(lists["val"]) & set(lists["test"]) == set()
    assert set().union(*lists.values()) == names
    # Default fractions 0.7 / 0.15 / 0.15 of 32 pairs.
    assert [len(lists[s]) for s in ("train", "val", "test")] == [22, 5, 5]


def test_image_and_label_formats(dataset: SyntheticDatasetSummary) -> None:
    root = dataset.root
    seen: set[int] = set()
    for name in sorted(_names(root, "A")):
        assert _png_header(root / "A" / name) == (SIZE, SIZE, 8, 2)  # 8-bit truecolour
        assert _png_header(root / "B" / name) == (SIZE, SIZE, 8, 2)
        assert _png_header(root / "label" / name) == (SIZE, SIZE, 8, 0)  # 8-bit greyscale
        a, b, label = _load(root, name)
        assert a.shape == b.shape == (SIZE, SIZE, 3) and a.dtype == b.dtype == np.uint8
        assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
        values = set(np.unique(label).tolist())
        assert values <= {0, 255}, f"{name}: label values {values}"
        seen |= values
    assert seen == {0, 255}


def test_images_are_rgb_on_disk(dataset: SyntheticDatasetSummary) -> None:
    # Soil, crops, forest and most roofs have more red than blue; a BGR mix-up flips that.
    from PIL import Image as image_mod

    red, green, blue = [], [], []
    for name in sorted(_names(dataset.root, "A")):
        with image_mod.open(dataset.root / "A" / name) as im:
            assert im.mode == "RGB"
            rgb = np.asarray(im, dtype=np.float64)
        red.append(rgb[..., 0].mean())
        green.append(rgb[..., 1].mean())
        blue.append(rgb[..., 2].mean())
    assert np.mean(red) > np.mean(blue) + 10
    assert np.mean(green) > np.mean(blue) + 10


def test_same_seed_same_bytes_and_prefix_stable(tmp_path: Path) -> None:
    first = make_synthetic_dataset(tmp_path / "a", pairs=6, size=64, seed=11)
    second = make_synthetic_dataset(tmp_path / "b", pairs=6, size=64, seed=11)
    assert first.change_fraction == second.change_fraction
    files_a, files_b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert len(files_a) == 6 * 3 + 3
    assert files_a == files_b

    make_synthetic_dataset(tmp_path / "c", pairs=6, size=64, seed=12)
    files_c = _all_files(tmp_path / "c")
    for sub in ("A", "B"):
        for k in range(6):
            key = f"{sub}/pair_{k:04d}.png"
            assert files_c[key] != files_a[key], f"{key} identical across seeds"

    # Pair k comes from its own generator, so a smaller dataset is a prefix of a larger one.
    make_synthetic_dataset(tmp_path / "d", pairs=3, size=64, seed=11)
    files_d = _all_files(tmp_path / "d")
    for sub in ("A", "B", "label"):
        for k in range(3):
            key = f"{sub}/pair_{k:04d}.png"
            assert files_d[key] == files_a[key], key


def test_label_marks_where_buildings_differ(dataset: SyntheticDatasetSummary) -> None:
    inside_sum = outside_sum = 0.0
    inside_n = outside_n = 0
    ratios = []
    for name in sorted(_names(dataset.root, "A")):
        a, b, label = _load(dataset.root, name)
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).sum(axis=2)
        changed = label > 0
        inside_sum += float(diff[changed].sum())
        inside_n += int(changed.sum())
        outside_sum += float(diff[~changed].sum())
        outside_n += int((~changed).sum())
        if changed.sum() >= 50:
            ratios.append(diff[changed].mean() / diff[~changed].mean())
    inside, outside = inside_sum / inside_n, outside_sum / outside_n
    # Building appearance/disappearance dominates the difference inside the label ...
    assert inside > 1.8 * outside, (inside, outside)
    # ... in most pairs, not just on average (a few vanish into similar-coloured ground) ...
    assert len(ratios) >= PAIRS // 2
    assert np.median(ratios) > 1.5, ratios
    assert np.mean(np.array(ratios) > 1.0) >= 0.8, ratios
    # ... but the unchanged area is far from identical: the distractors (season, shadows,
    # noise, blur, crop rotation) are there and unlabelled.
    assert outside > 15.0, outside


def test_change_statistics(dataset: SyntheticDatasetSummary) -> None:
    fractions = []
    for name in sorted(_names(dataset.root, "label")):
        label = cv2.imread(str(dataset.root / "label" / name), cv2.IMREAD_UNCHANGED)
        fractions.append(float((label > 0).mean()))
    fractions_arr = np.array(fractions)
    assert 0.01 <= fractions_arr.mean() <= 0.15, fractions_arr.mean()
    empty = int((fractions_arr == 0).sum())
    assert 1 <= empty <= PAIRS // 3, empty  # some unchanged tiles, but not mostly
    assert fractions_arr.max() < 0.5


def test_summary_matches_disk(dataset: SyntheticDatasetSummary) -> None:
    root = dataset.root
    assert isinstance(root, Path) and root.is_dir()
    assert dataset.pairs == PAIRS and dataset.size == SIZE
    assert dataset.splits == {s: len(_read_list(root, s)) for s in ("train", "val", "test")}
    assert sum(dataset.splits.values()) == PAIRS
    on_disk = np.mean(
        [
            (cv2.imread(str(root / "label" / n), cv2.IMREAD_UNCHANGED) > 0).mean()
            for n in sorted(_names(root, "label"))
        ]
    )
    assert dataset.change_fraction == pytest.approx(on_disk, rel=1e-9, abs=1e-12)
    with pytest.raises(AttributeError):
        dataset.pairs = 1  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [(1, [1, 0, 0]), (2, [1, 1, 0]), (3, [1, 1, 1]), (4, [2, 1, 1]), (10, [7, 2, 1])],
)
def test_small_datasets_split_counts(tmp_path: Path, pairs: int, expected: list[int]) -> None:
    summary = make_synthetic_dataset(tmp_path, pairs=pairs, size=32, seed=0)
    counts = [len(_read_list(tmp_path, s)) for s in ("train", "val", "test")]
    assert counts == expected
    assert list(summary.splits.values()) == expected
    assert len(list((tmp_path / "A").iterdir())) == pairs


def test_accepts_str_path_and_custom_fractions(tmp_path: Path) -> None:
    summary = make_synthetic_dataset(str(tmp_path / "s"), pairs=10, size=48, split_fractions=(1, 1, 2))
    assert summary.root == tmp_path / "s"
    assert summary.splits == {"train": 3, "val": 2, "test": 5}
    a = cv2.imread(str(tmp_path / "s" / "A" / "pair_0000.png"), cv2.IMREAD_UNCHANGED)
    assert a.shape == (48, 48, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pairs": 0},
        {"pairs": -3},
        {"pairs": 2.5},
        {"pairs": 4, "size": 31},
        {"pairs": 4, "size": 0},
        {"pairs": 4, "split_fractions": (0.7, 0.3, 0.0)},
        {"pairs": 4, "split_fractions": (-0.1, 0.6, 0.5)},
        {"pairs": 4, "split_fractions": (0.5, 0.5)},
        {"pairs": 4, "split_fractions": (0.5, float("nan"), 0.5)},
    ],
)
def test_invalid_arguments_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()  # validation happens before anything is written
