"""Dataset presets and folder mappings, each on a tiny made-up copy of the published layout."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from schemas.training import DATASET_PRESETS, ConfigError, TrainConfig
from snunet_cbam.data.check import check_pairs
from snunet_cbam.data.dataset import PairLoader
from snunet_cbam.data.layouts import PRESETS, DatasetLayoutError, list_split
from snunet_cbam.data.splits import hold_out, run_splits
from tests.ml.conftest import tiny_config

SIDE = 32

# preset -> (structure, folder of date A, of date B, of the label, image suffix, label suffix per
# split, splits with their pair counts), as each dataset's archive ships them.
LAYOUTS = {
    "levir-cd": ("split", "A", "B", "label", ".png", {}, {"train": 4, "val": 2, "test": 2}),
    "levir-cd+": ("split", "A", "B", "label", ".png", {}, {"train": 10, "test": 2}),
    "whu-cd": ("tiled", "A", "B", "label", ".png", {}, {"train": 4, "val": 2, "test": 2}),
    "cdd": ("split", "A", "B", "OUT", ".jpg", {}, {"train": 4, "val": 2, "test": 2}),
    "sysu-cd": ("split", "time1", "time2", "label", ".png", {}, {"train": 4, "val": 2, "test": 2}),
    "s2looking": ("split", "Image1", "Image2", "label", ".png", {}, {"train": 4, "val": 2, "test": 2}),
    "dsifn": ("split", "t1", "t2", "mask", ".jpg", {"train": ".png", "val": ".png", "test": ".tif"},
              {"train": 4, "val": 2, "test": 2}),
}


def _image(rng) -> np.ndarray:
    return rng.integers(0, 255, (SIDE, SIDE, 3)).astype(np.uint8)


def _label() -> np.ndarray:
    label = np.zeros((SIDE, SIDE), np.uint8)
    label[8:20, 8:20] = 255
    return label


def make_layout(root: Path, preset: str) -> Path:
    """A tiny copy of ``preset``'s published layout under ``root``."""
    structure, a, b, label, suffix, label_suffixes, splits = LAYOUTS[preset]
    rng = np.random.default_rng(0)
    for split, count in splits.items():
        folder = root if structure == "tiled" else root / split
        for sub in (a, b, label):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        if preset == "s2looking":  # S2Looking also ships the new/demolished building masks
            (folder / "label1").mkdir(exist_ok=True)
            (folder / "label2").mkdir(exist_ok=True)
        names = []
        for i in range(count):
            name = f"{split}_{i}{suffix}" if structure == "tiled" else f"{i}{suffix}"
            names.append(name)
            cv2.imwrite(str(folder / a / name), _image(rng))
            cv2.imwrite(str(folder / b / name), _image(rng))
            label_name = Path(name).stem + label_suffixes.get(split, suffix)
            cv2.imwrite(str(folder / label / label_name), _label())
        if structure == "tiled":
            (root / "list").mkdir(exist_ok=True)
            (root / "list" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_the_presets_are_the_configs_presets():
    assert set(PRESETS) == set(DATASET_PRESETS) == set(LAYOUTS)
    with pytest.raises(ConfigError, match="dataset"):
        TrainConfig.from_mapping({"dataset": "levir"})


@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_each_preset_reads_its_published_layout(tmp_path, preset):
    root = make_layout(tmp_path / preset, preset)
    config = TrainConfig(dataset=preset)
    roles = run_splits(root, config)
    splits = LAYOUTS[preset][-1]
    assert set(roles) == {"train", "val", "test"}
    assert len(roles["test"].pairs) == splits["test"]
    if "val" in splits:
        assert [len(roles[r].pairs) for r in ("train", "val")] == [splits["train"], splits["val"]]
    else:  # LEVIR-CD+: validation held out of train, 10% (at least one pair)
        assert [len(roles[r].pairs) for r in ("train", "val")] == [9, 1]
        assert "held out of train" in roles["val"].split
    for role in roles.values():
        report = check_pairs(role.pairs, role.split)
        assert report.ok, report.describe()
        image_a, image_b, mask = PairLoader(role.pairs)[0]
        assert image_a.shape == image_b.shape == (SIDE, SIDE, 3) and mask.sum() == 12 * 12


@pytest.mark.parametrize("preset", ["sysu-cd", "s2looking", "dsifn", "cdd"])
def test_other_folder_names_need_the_preset_or_a_mapping(tmp_path, preset):
    root = make_layout(tmp_path / preset, preset)
    _, a, b, label, *_ = LAYOUTS[preset]
    if a == "A":  # CDD: the dates are found, but not its labels (OUT/)
        report = check_pairs(list_split(root, "train"), "train")
        assert not report.valid and "missing label" in report.describe()
    else:
        with pytest.raises(DatasetLayoutError, match="neither the tiled layout"):
            list_split(root, "train")
    mapped = TrainConfig.from_mapping({"folders": {"a": a, "b": b, "label": label}})
    assert check_pairs(run_splits(root, mapped)["val"].pairs, "val").ok


def test_a_preset_names_what_it_expected(tmp_path):
    root = make_layout(tmp_path / "levir", "levir-cd")
    with pytest.raises(DatasetLayoutError, match=r"sysu-cd layout \(\{train\|val\|test\}/\{time1,time2,label\}/\)"):
        run_splits(root, TrainConfig(dataset="sysu-cd"))
    plus = make_layout(tmp_path / "plus", "levir-cd+")
    with pytest.raises(DatasetLayoutError, match="set val_fraction"):
        run_splits(plus, TrainConfig(dataset="levir-cd+", val_fraction=None))


def test_the_held_out_pairs_depend_on_the_names_only(tmp_path):
    root = make_layout(tmp_path / "plus", "levir-cd+")
    pairs = list_split(root, "train")
    kept, held = hold_out(pairs, 0.3)
    kept_rev, held_rev = hold_out(list(reversed(pairs)), 0.3)
    assert {p.name for p in held} == {p.name for p in held_rev} and len(held) == 3
    assert not {p.name for p in kept} & {p.name for p in held}
    with pytest.raises(DatasetLayoutError, match="1 training pair"):
        hold_out(pairs[:1], 0.1)


def test_training_on_levir_cd_plus_validates_on_held_out_pairs(tmp_path):
    """The default val_split 'val' is missing from LEVIR-CD+: the run holds out validation pairs
    instead of failing, and scores the test split at the end."""
    from snunet_cbam.trainer import Trainer

    root = make_layout(tmp_path / "plus", "levir-cd+")
    config = tiny_config(dataset="levir-cd+", train_split="train", val_split="val", test_split="test",
                         epochs=1, crop_size=32, crops_per_image=1, batch_size=2, window_size=None, window_overlap=0)
    result = Trainer(config, root, tmp_path / "run").fit()
    assert result.status == "completed"
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["test"]["tp"] + metrics["test"]["fn"] == 2 * 12 * 12  # both test pairs scored
