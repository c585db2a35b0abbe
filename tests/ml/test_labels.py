"""Labels: pixels >= label_threshold are change; a label that would read as all "no change"
(a 0/1 mask under the default 128) is refused before training, naming the file and the fix."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from cdtrain.cli import main
from snunet_cbam.data.check import check_pairs
from snunet_cbam.data.dataset import PairLoader
from snunet_cbam.data.imageio import LabelValueError, read_mask
from snunet_cbam.data.layouts import list_split


def _change() -> np.ndarray:
    change = np.zeros((64, 64), bool)
    change[10:30, 20:50] = True
    return change


def _dataset(root: Path, labels: dict[str, np.ndarray]) -> Path:
    """A tiled dataset: one pair per label, named ``train_<name>.png``."""
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    image = np.full((64, 64, 3), 90, np.uint8)
    for name, label in labels.items():
        cv2.imwrite(str(root / "A" / f"train_{name}.png"), image)
        cv2.imwrite(str(root / "B" / f"train_{name}.png"), image)
        cv2.imwrite(str(root / "label" / f"train_{name}.png"), label)
    return root


def test_a_0_1_mask_is_refused_with_the_file_the_values_and_the_fix(tmp_path):
    change = _change()
    root = _dataset(tmp_path, {"ok": change.astype(np.uint8) * 255, "binary": change.astype(np.uint8),
                               "classes": np.where(change, 2, 1).astype(np.uint8)})
    report = check_pairs(list_split(root, "train"), "train")
    assert [p.name for p in report.valid] == ["train_ok.png"]
    problems = {p.name: " | ".join(p.reasons) for p in report.problems}
    assert set(problems) == {"train_binary.png", "train_classes.png"}  # every bad label, named
    reason = problems["train_binary.png"]
    assert str(root / "label" / "train_binary.png") in reason
    assert "has values 0, 1 but none >= label_threshold 128" in reason
    assert "expected 0 = no change and 255 = change; for 0/1 masks set label_threshold: 1" in reason
    assert "has values 1, 2 but" in problems["train_classes.png"]
    with pytest.raises(LabelValueError, match="for 0/1 masks set label_threshold: 1"):
        read_mask(root / "label" / "train_binary.png")


def test_label_threshold_1_accepts_a_0_1_mask(tmp_path):
    change = _change()
    root = _dataset(tmp_path, {"binary": change.astype(np.uint8)})
    pairs = list_split(root, "train")
    assert check_pairs(pairs, "train", label_threshold=1).ok
    assert np.array_equal(PairLoader(pairs, label_threshold=1)[0][2], change)
    assert np.array_equal(read_mask(pairs[0].label, threshold=1), change)


def test_0_255_and_jpeg_noisy_labels_binarise_at_the_threshold(tmp_path):
    change = _change()
    rng = np.random.default_rng(0)
    noisy = np.where(change, rng.choice([248, 251, 255], change.shape), rng.choice([0, 3, 7], change.shape))
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 2] = change * 255  # red only: RGB labels are reduced by max
    root = _dataset(tmp_path, {"clean": change.astype(np.uint8) * 255, "noisy": noisy.astype(np.uint8),
                               "rgb": rgb, "empty": np.zeros((64, 64), np.uint8)})
    cv2.imwrite(str(root / "label" / "train_jpeg.jpg"), change.astype(np.uint8) * 255)  # real JPEG noise
    for sub in ("A", "B"):
        cv2.imwrite(str(root / sub / "train_jpeg.jpg"), np.full((64, 64, 3), 90, np.uint8))
    pairs = list_split(root, "train")
    assert check_pairs(pairs, "train").ok and len(pairs) == 5
    masks = {p.name: read_mask(p.label) for p in pairs}
    for name in ("train_clean.png", "train_noisy.png", "train_rgb.png"):
        assert np.array_equal(masks[name], change), name
    assert (masks["train_jpeg.jpg"] == change).mean() > 0.99
    assert not masks["train_empty.png"].any()  # no change at all is a valid label
    assert set(np.unique(masks["train_noisy.png"])) == {0, 1}


def test_cdtrain_check_takes_the_label_threshold(tmp_path, capsys):
    root = _dataset(tmp_path, {"binary": _change().astype(np.uint8)})
    args = ["check", "--data", str(root), "--split", "train"]
    assert main(args) == 1
    assert "label_threshold: 1" in capsys.readouterr().out
    assert main([*args, "--label-threshold", "1"]) == 0
    assert main([*args, "--set", "label_threshold=1"]) == 0
    assert main([*args, "--label-threshold", "0"]) == 2  # validated like the config key
