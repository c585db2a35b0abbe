"""GeoTIFF and multi-band input: band selection, 16-bit scaling, the check, and training with
``in_channels`` following the bands. 8-bit RGB PNG/JPEG read exactly as before."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from schemas.training import ConfigError, TrainConfig
from snunet_cbam.data.check import ImageTooLargeError, check_pairs
from snunet_cbam.data.dataset import PairLoader, to_tensor
from snunet_cbam.data.geotiff import ImageBandsError, ImageSpec, read_image
from snunet_cbam.data.imageio import read_rgb
from snunet_cbam.data.layouts import list_split
from tests.ml.conftest import tiny_config

SIDE = 48


def _tif(path, chw: np.ndarray, nodata=None):
    count, height, width = chw.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype=chw.dtype.name,
                       crs="EPSG:32633", transform=from_origin(500_000, 5_000_000, 10, 10), nodata=nodata) as dst:
        dst.write(chw)
    return path


def _bands16(seed: int = 0) -> np.ndarray:
    """4 bands of 16-bit data, each band in its own value range (band k: 1000k .. 1000k + 4000)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(1000 * k, 1000 * k + 4000, (SIDE, SIDE)) for k in range(1, 5)]).astype(np.uint16)


def test_8bit_png_and_jpeg_read_exactly_as_before(levir_samples, tmp_path):
    pair = list_split(levir_samples, "demo")[0]
    assert np.array_equal(read_image(pair.image_a), read_rgb(pair.image_a))
    jpeg = tmp_path / "x.jpg"
    cv2.imwrite(str(jpeg), cv2.imread(str(pair.image_a)))
    assert np.array_equal(read_image(jpeg), read_rgb(jpeg))
    assert np.array_equal(PairLoader([pair])[0][0], read_rgb(pair.image_a))


def test_an_8bit_rgb_geotiff_reads_as_its_pixels(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (3, SIDE, SIDE)).astype(np.uint8)
    path = _tif(tmp_path / "rgb.tif", rgb)
    assert np.array_equal(read_image(path), rgb.transpose(1, 2, 0))


def test_bands_are_selected_1_based_and_16bit_stretched_per_band(tmp_path):
    data = _bands16()
    path = _tif(tmp_path / "s2.tif", data)
    image = read_image(path, ImageSpec(bands=(3, 2, 1)))
    assert image.shape == (SIDE, SIDE, 3) and image.dtype == np.uint8
    for channel, band in enumerate((3, 2, 1)):
        values = data[band - 1].astype(np.float64)
        low, high = np.percentile(values, [2, 98])
        expected = np.clip(np.rint((values - low) * 255 / (high - low)), 0, 255)
        # float32 arithmetic against float64: at most one level apart
        assert np.abs(image[..., channel].astype(int) - expected).max() <= 1
        assert (image[..., channel] == 0).mean() == pytest.approx(0.02, abs=0.01)
        assert (image[..., channel] == 255).mean() == pytest.approx(0.02, abs=0.01)
    # A fixed range is one mapping for every image: band 4 (4000-8000) over [0, 10000].
    fixed = read_image(path, ImageSpec(bands=(4,), range=(0, 10000)))
    assert np.array_equal(fixed[..., 0], np.rint(data[3] * 255.0 / 10000).astype(np.uint8))


def test_nodata_pixels_do_not_set_the_stretch(tmp_path):
    data = _bands16()[:3]
    data[:, :8] = 0  # a nodata border
    with_nodata = read_image(_tif(tmp_path / "a.tif", data, nodata=0))
    # Had the zeros (17% of the pixels) counted, the 2nd percentile would be 0 and no valid
    # pixel would map to 0; without them, the darkest 2% of the valid pixels do.
    assert (with_nodata[8:, :, 0] == 0).mean() == pytest.approx(0.02, abs=0.01)


def test_band_problems_are_named(tmp_path):
    path = _tif(tmp_path / "rgbn.tif", _bands16())
    with pytest.raises(ImageBandsError, match=r"rgbn.tif: has 4 band\(s\), expected 3 \(RGB\); choose bands"):
        read_image(path)
    with pytest.raises(ImageBandsError, match=r"bands \[5, 1\] asks for band 5"):
        read_image(path, ImageSpec(bands=(5, 1)))
    with pytest.raises(ConfigError, match="bands must not repeat"):
        TrainConfig.from_mapping({"bands": [1, 1]})
    with pytest.raises(ConfigError, match="bands"):
        TrainConfig.from_mapping({"bands": [0]})  # 1-based


def _dataset(root, pairs: int = 4):
    """Tiled layout of 16-bit 4-band GeoTIFF pairs: date B's band 4 jumps in a square (change)."""
    for folder in ("A", "B", "label"):
        (root / folder).mkdir(parents=True)
    for i in range(pairs):
        a = _bands16(i)
        b = a.copy()
        b[3, 8:24, 8:24] += 2500
        label = np.zeros((SIDE, SIDE), np.uint8)
        label[8:24, 8:24] = 255
        _tif(root / "A" / f"demo_{i}.tif", a)
        _tif(root / "B" / f"demo_{i}.tif", b)
        cv2.imwrite(str(root / "label" / f"demo_{i}.png"), label)
    return root


def test_the_check_counts_bands(tmp_path):
    root = _dataset(tmp_path / "data", pairs=1)
    pairs = list_split(root, "demo")
    report = check_pairs(pairs, "demo")
    assert not report.ok and "image A has 4 band(s), expected 3 (RGB)" in report.describe()
    assert check_pairs(pairs, "demo", image_spec=ImageSpec(bands=(4, 3, 2))).ok
    report = check_pairs(pairs, "demo", image_spec=ImageSpec(bands=(6,)))
    assert "asks for band 6" in report.describe()
    # The pixel limit holds for GeoTIFFs too, from their header.
    with pytest.raises(ImageTooLargeError, match="CDTRAIN_MAX_IMAGE_PIXELS"):
        check_pairs(pairs, "demo", image_spec=ImageSpec(bands=(4, 3, 2)), max_image_pixels=32 * 32)


def test_normalisation_of_other_band_counts():
    image = np.full((4, 4, 5), 128, np.uint8)
    x = to_tensor(image, "imagenet")
    assert x.shape == (5, 4, 4) and np.allclose(x.numpy(), x.numpy()[0, 0, 0])  # one statistic for all bands
    rgb = to_tensor(np.full((4, 4, 3), 128, np.uint8), "imagenet")
    assert not np.allclose(rgb[0].numpy(), rgb[1].numpy())  # RGB keeps ImageNet's per-channel values


@pytest.fixture(scope="module")
def four_band_run(tmp_path_factory):
    """A one-epoch run on 16-bit 4-band GeoTIFFs with bands [1, 2, 3, 4]: (data root, result)."""
    from snunet_cbam.trainer import Trainer

    tmp = tmp_path_factory.mktemp("four-bands")
    root = _dataset(tmp / "data")
    config = tiny_config(bands=[1, 2, 3, 4], epochs=1, crop_size=32, crops_per_image=1, batch_size=2,
                         window_size=None, window_overlap=0, color_jitter_prob=1.0)
    return root, Trainer(config, root, tmp / "run").fit()


def test_training_evaluation_and_prediction_on_four_bands(four_band_run, tmp_path):
    """bands [1, 2, 3, 4]: the model takes 4 channels per date, end to end."""
    from snunet_cbam.checkpoint import model_from_checkpoint
    from snunet_cbam.checkpoint_eval import evaluate_checkpoint
    from snunet_cbam.predict import predict_scene

    root, result = four_band_run
    assert result.status == "completed"
    model, loaded, _ = model_from_checkpoint(result.best_checkpoint)
    assert loaded.in_channels == 4 and model.conv0_0.conv1.in_channels == 4
    scores = evaluate_checkpoint(result.best_checkpoint, root, split="demo", device="cpu")
    assert scores["pairs"] == 4 and scores["tp"] + scores["fn"] == 4 * 16 * 16
    maps = predict_scene(root / "A" / "demo_0.tif", root / "B" / "demo_0.tif", tmp_path / "pred",
                         checkpoint=result.best_checkpoint)
    with rasterio.open(maps.mask) as src:
        assert (src.width, src.height, src.crs.to_epsg()) == (SIDE, SIDE, 32633)


def test_a_four_band_model_exports_for_mlflow(four_band_run, tmp_path):
    """The logged pyfunc model takes the 2 x 4 bands of the pair on its channel axis."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    from consumer.tracking.model import log_best_model

    _, result = four_band_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bands", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    info = log_best_model(client, run_id, result.best_checkpoint)
    assert info.dynamic_hw  # also verified at an odd size, with 8 channels
    assert client.get_logged_model(info.model_id).status == LoggedModelStatus.READY
