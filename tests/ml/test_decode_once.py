"""Every image of a run is decoded once: training and validation images are cached before the
first epoch, and the test split is read once at the end, however many epochs run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import snunet_cbam.data.dataset as dataset_module
from snunet_cbam.synthetic import make_synthetic_dataset
from snunet_cbam.trainer import Trainer
from tests.ml.conftest import tiny_config


def test_a_three_epoch_run_decodes_each_image_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    make_synthetic_dataset(data, pairs=12, size=64, seed=3)
    decoded: Counter[str] = Counter()
    read_image = dataset_module.read_image

    def counting_read_image(path, *args, **kwargs):
        decoded[Path(path).name + "@" + Path(path).parent.name] += 1
        return read_image(path, *args, **kwargs)

    # num_workers=0 keeps every decode in this process, where the count sees it.
    monkeypatch.setattr(dataset_module, "read_image", counting_read_image)
    config = tiny_config(epochs=3, train_split="train", val_split="val", test_split="test", crop_size=32,
                         window_size=None, window_overlap=0)
    result = Trainer(config, data, tmp_path / "out").fit()

    assert result.epochs_run == 3 and result.test  # validation ran 3 times, the test split once
    splits = {split: (data / "list" / f"{split}.txt").read_text().split() for split in ("train", "val", "test")}
    expected = {f"{name}@{folder}" for names in splits.values() for name in names for folder in ("A", "B")}
    assert set(decoded) == expected
    assert {key: n for key, n in decoded.items() if n != 1} == {}
