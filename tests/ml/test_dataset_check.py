import shutil

import numpy as np
import pytest
from PIL import Image

from schemas.training import TrainConfig
from snunet_cbam.data.check import InvalidDatasetError, check_pairs
from snunet_cbam.data.layouts import DatasetLayoutError, detect_layout, list_split
from snunet_cbam.trainer import check_dataset


def test_shared_samples_report_names_the_bad_pair_and_every_reason(levir_samples):
    report = check_pairs(list_split(levir_samples, "test"), "test")
    assert [p.name for p in report.problems] == ["test_113_0256.png"]
    reasons = " | ".join(report.problems[0].reasons)
    assert "image A has 4 channels" in reasons and "image B has 4 channels" in reasons
    assert "missing label" in reasons
    assert "size mismatch" in reasons and "768x384" in reasons and "768x383" in reasons
    assert len(report.valid) == 7


def test_list_file_defines_a_split_and_prefixes_are_the_fallback(levir_samples):
    assert detect_layout(levir_samples) == "tiled"
    demo = list_split(levir_samples, "demo")
    assert len(demo) == 7 and all(p.label is not None for p in demo)
    assert [p.name for p in list_split(levir_samples, "train")] == [
        "train_36_0512_0512.png", "train_386_0512_0768.png", "train_412_0512_0768.png"]
    assert len(list_split(levir_samples, "all")) == 12
    with pytest.raises(DatasetLayoutError, match="split 'nope' is empty"):
        list_split(levir_samples, "nope")


def test_training_stops_before_it_starts_with_the_report(levir_samples):
    with pytest.raises(InvalidDatasetError) as info:
        check_dataset(TrainConfig(), levir_samples)
    message = str(info.value)
    assert "test_113_0256.png" in message and "skip_invalid" in message
    checked = check_dataset(TrainConfig(skip_invalid=True), levir_samples)
    assert [p.name for p in checked.reports["test"].problems] == ["test_113_0256.png"]
    assert len(checked.valid("train")) == 3 and len(checked.valid("val")) == 1


def test_published_layout_and_unreadable_files(tmp_path, levir_samples):
    root = tmp_path / "levir"
    for split in ("train", "val"):
        for sub in ("A", "B", "label"):
            (root / split / sub).mkdir(parents=True)
    for sub in ("A", "B", "label"):
        shutil.copy(levir_samples / sub / "test_2_0000_0000.png", root / "train" / sub / "1.png")
        shutil.copy(levir_samples / sub / "val_27_0000_0256.png", root / "val" / sub / "2.png")
    (root / "train" / "A" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(root / "train" / "B" / "broken.png")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(root / "train" / "label" / "broken.png")
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(root / "train" / "A" / "small.png")
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(root / "train" / "B" / "small.png")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(root / "train" / "label" / "small.png")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(root / "train" / "A" / "gray.png")

    assert detect_layout(root) == "published"
    report = check_pairs(list_split(root, "train"), "train")
    problems = {p.name: " | ".join(p.reasons) for p in report.problems}
    assert [p.name for p in report.valid] == ["1.png"]
    assert "unreadable image A" in problems["broken.png"]
    assert "size mismatch: A 128x128, B 256x256, label 256x256" in problems["small.png"]
    assert "image A has 1 channels" in problems["gray.png"] and "missing image B" in problems["gray.png"]
    with pytest.raises(DatasetLayoutError, match="split 'test' not found"):
        list_split(root, "test")


def test_a_directory_without_a_known_layout_is_refused(tmp_path):
    with pytest.raises(DatasetLayoutError, match="neither the tiled layout"):
        detect_layout(tmp_path)
