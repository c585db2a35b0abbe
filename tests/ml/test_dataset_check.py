import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from schemas.training import TrainConfig
from snunet_cbam.data.check import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, InvalidDatasetError, check_pairs
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


# --- the pixel limit --------------------------------------------------------------------------


def _png_header(path, width, height, color_type=2):
    """A PNG whose header claims ``width`` x ``height`` (8-bit RGB, or grey with color_type 0) but
    holds a few bytes of pixel data: nothing can decode it, so any attempt shows as a reason."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def _pair(root, split, name, size):
    for sub, shape in (("A", (size, size, 3)), ("B", (size, size, 3)), ("label", (size, size))):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros(shape, np.uint8)).save(root / split / sub / name)


def test_an_image_over_the_pixel_limit_refuses_the_dataset_whole_and_one_at_it_passes(tmp_path):
    root = tmp_path / "levir"
    for name in ("a.png", "b.png"):
        _pair(root, "train", name, 32)
    _pair(root, "train", "big.png", 33)
    _pair(root, "val", "v.png", 32)
    with pytest.raises(ImageTooLargeError) as info:
        check_pairs(list_split(root, "train"), "train", max_image_pixels=32 * 32)
    message = str(info.value)
    assert message.startswith("the dataset has images over the limit of 1,024 pixels (CDTRAIN_MAX_IMAGE_PIXELS on "
                              "the workers)") and "skip_invalid does not skip them" in message
    assert ("big.png: image A is 33x33 = 1,089 pixels, over the limit of 1,024 pixels (CDTRAIN_MAX_IMAGE_PIXELS); "
            "image B is 33x33 = 1,089 pixels") in message and "label is 33x33" in message
    assert [r.oversized for r in info.value.reports] == [["big.png"]]
    assert "a.png" not in message  # the pairs at the limit are fine

    # skip_invalid skips broken pairs, not this: the run stops before training.
    with pytest.raises(ImageTooLargeError):
        check_dataset(TrainConfig(skip_invalid=True), root, max_image_pixels=32 * 32)
    checked = check_dataset(TrainConfig(), root, max_image_pixels=33 * 33)  # exactly at the limit
    assert len(checked.valid("train")) == 3 and len(checked.valid("val")) == 1


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_image_is_refused_from_its_header_and_never_decoded(tmp_path):
    root = tmp_path / "scenes"
    _png_header(root / "train" / "A" / "s.png", 12_000, 12_000)  # 144 Mpx: over the default 2**27
    _png_header(root / "train" / "B" / "s.png", 20_000, 20_000)  # 400 Mpx: Pillow itself refuses the header
    _png_header(root / "train" / "label" / "s.png", 12_000, 12_000, color_type=0)
    assert 12_000**2 > DEFAULT_MAX_IMAGE_PIXELS > 2**26
    with pytest.raises(ImageTooLargeError) as info:
        check_pairs(list_split(root, "train"), "train")
    reasons = info.value.reports[0].problems[0].reasons
    assert reasons[0] == ("image A is 12000x12000 = 144,000,000 pixels, over the limit of 134,217,728 pixels "
                          "(CDTRAIN_MAX_IMAGE_PIXELS)")
    assert reasons[1].startswith("image B is larger than Pillow opens (Image size (400000000 pixels) exceeds limit")
    assert reasons[2].startswith("label is 12000x12000 = 144,000,000 pixels")
    # Decoding any of them fails (they hold 16 bytes of pixels): a decode would have added an
    # "unreadable" or "cannot decode" reason, and the label's values are only read once decoded.
    assert len(reasons) == 3 and not any("unreadable" in r or "decode" in r for r in reasons)
