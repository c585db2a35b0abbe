"""``cdtrain predict`` / ``predict_scene``: georeferenced outputs, the evaluation's decision, tiles
blended without seams, bounded reads, clear errors, and models from a real MLflow registry."""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin
from torch.utils.data import DataLoader

from cdtrain.cli import build_parser, main
from snunet_cbam.checkpoint import build_model, model_from_checkpoint, save_checkpoint
from snunet_cbam.checkpoint_eval import evaluate_checkpoint
from snunet_cbam.data.dataset import EvalPairDataset, PairLoader
from snunet_cbam.data.geotiff import ImageSpec
from snunet_cbam.data.layouts import list_split
from snunet_cbam.inference import predict_logits
from snunet_cbam.metrics import change_mask
from snunet_cbam.model_source import ModelSourceError
from snunet_cbam.predict import Predictor, ScenePairError, output_paths, predict_scene
from tests.crafted_models import crafted_config, difference_checkpoint

CRS_UTM = CRS.from_epsg(32633)
TRANSFORM = from_origin(500_000.0, 5_000_000.0, 0.5, 0.5)


def _scene(height: int, width: int, seed: int = 0, step: int = 150):
    """A before/after pair (HWC uint8) where squares of the after image are redder, and their mask."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 100, (height, width, 3)).astype(np.uint8)
    b, truth = a.copy(), np.zeros((height, width), bool)
    for _ in range(max(2, height * width // 600)):
        y, x = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        b[y : y + 8, x : x + 8, 0] = a[y : y + 8, x : x + 8, 0] + step
        truth[y : y + 8, x : x + 8] = True
    return a, b, truth


def _write_tif(path, image: np.ndarray, crs=CRS_UTM, transform=TRANSFORM):
    """``image`` HWC (any dtype) as a GeoTIFF, bands in channel order."""
    height, width, count = image.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype=image.dtype.name,
                       crs=crs, transform=transform) as dst:
        dst.write(image.transpose(2, 0, 1))
    return path


def _pair(tmp_path, a, b, **kwargs):
    return _write_tif(tmp_path / "before.tif", a, **kwargs), _write_tif(tmp_path / "after.tif", b, **kwargs)


def _random_checkpoint(path, threshold: float = 0.5, **overrides):
    """An untrained model (seeded): its logits vary in space and depend on the padding, unlike the
    crafted per-pixel model, so tile handling shows in its output."""
    config = crafted_config(use_attention=True, tta="none", **overrides)
    torch.manual_seed(3)
    model = build_model(config)
    save_checkpoint(path, {"model": model.state_dict(), "config": config.model_dump(), "epoch": 1,
                           "best": {"epoch": 1, "f1": 0.5}, "threshold": threshold})
    return path


def _read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.crs, src.transform, src.dtypes[0], src.tags()


def test_outputs_keep_the_inputs_grid_and_mark_the_change(tmp_path):
    a, b, truth = _scene(48, 64)
    before, after = _pair(tmp_path, a, b)
    checkpoint = difference_checkpoint(tmp_path / "diff.pt", threshold=75)
    result = predict_scene(before, after, tmp_path / "out" / "site", checkpoint=checkpoint)

    mask, crs, transform, dtype, tags = _read(result.mask)
    assert (crs, transform, dtype) == (CRS_UTM, TRANSFORM, "uint8")
    assert set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask == 255, truth)  # |R_B - R_A| = 150 > 75 exactly in the squares
    probability, crs, transform, dtype, _ = _read(result.probability)
    assert (crs, transform, dtype) == (CRS_UTM, TRANSFORM, "float32")
    assert probability.min() >= 0 and probability.max() <= 1
    assert np.array_equal(probability > result.threshold, mask == 255)
    assert float(tags["threshold"]) == result.threshold == 0.5  # the checkpoint's threshold
    overlay = cv2.imread(str(result.overlay))[..., ::-1]
    assert overlay.shape == (48, 64, 3)
    # Changed pixels are tinted red, the others are the after image.
    assert np.array_equal(overlay[~truth], b[~truth])
    assert (overlay[truth][:, 0].astype(int) > overlay[truth][:, 1].astype(int) + 50).all()
    assert result.changed_pixels == int(truth.sum())
    assert result.mask.name == "site_mask.tif"
    assert output_paths(tmp_path / "out")[0] == tmp_path / "out" / "change_mask.tif"  # an existing directory


def _eval_path_logits(checkpoint, root, split, spec):
    """The logits of evaluation's code path (checkpoint_eval's loader, scoring's predict_logits)."""
    model, config, _ = model_from_checkpoint(checkpoint)
    model.eval()
    pairs = PairLoader(list_split(root, split), image_spec=spec)
    item = next(iter(DataLoader(EvalPairDataset(pairs, config.normalize), batch_size=1)))
    return predict_logits(model, item["a"], item["b"], window=config.window_size, overlap=config.window_overlap,
                          blend=config.window_blend, tta=config.tta)[0, 0], item["label"][0, 0]


def _dataset_of(tmp_path, before, after, truth):
    """The pair as a one-pair dataset (tiled layout, list/val.txt) for the evaluation path."""
    root = tmp_path / "data"
    for folder in ("A", "B", "label", "list"):
        (root / folder).mkdir(parents=True)
    (root / "A" / "site.tif").write_bytes(before.read_bytes())
    (root / "B" / "site.tif").write_bytes(after.read_bytes())
    cv2.imwrite(str(root / "label" / "site.png"), truth.astype(np.uint8) * 255)
    (root / "list" / "val.txt").write_text("site.tif\n")
    return root


@pytest.mark.parametrize("kind", ["whole", "tiled"])
def test_the_mask_is_the_evaluation_paths_mask(tmp_path, kind):
    """16-bit 4-band scenes read with bands [3, 2, 1]: an image that fits one window (whole) and
    one that does not (windows of 32, overlap 16). The threshold sits at the median probability,
    so half the pixels are change and every one of them must be decided as evaluation decides."""
    size = (40, 48) if kind == "whole" else (80, 72)
    rng = np.random.default_rng(1)
    a = rng.integers(1000, 9000, (*size, 4)).astype(np.uint16)
    b = a.copy()
    b[10:30, 10:30, 2] += 3000
    truth = np.zeros(size, bool)
    truth[10:30, 10:30] = True
    before, after = _pair(tmp_path, a, b)
    root = _dataset_of(tmp_path, before, after, truth)
    overrides = dict(bands=[3, 2, 1], window_size=48 if kind == "whole" else 32, window_overlap=16)
    probe = _random_checkpoint(tmp_path / "probe.pt", **overrides)
    spec = ImageSpec.from_config(crafted_config(bands=[3, 2, 1]))
    logits, label = _eval_path_logits(probe, root, "val", spec)
    threshold = float(torch.sigmoid(logits).median())
    checkpoint = _random_checkpoint(tmp_path / "model.pt", threshold=threshold, **overrides)
    expected = change_mask(logits, threshold).numpy()
    assert 0.3 < expected.mean() < 0.7

    result = predict_scene(before, after, tmp_path / "pred", checkpoint=checkpoint)
    mask = _read(result.mask)[0] == 255
    probability = _read(result.probability)[0]
    assert result.tiles == (1 if kind == "whole" else 16)
    if kind == "whole":
        assert np.array_equal(mask, expected)
        assert np.array_equal(probability, torch.sigmoid(logits).numpy())
    else:  # the same windows, weights and order; only the batching of windows differs
        assert np.abs(probability - torch.sigmoid(logits).numpy()).max() < 1e-5
        assert (mask != expected).mean() < 1e-3
    # And the scores evaluation reports are the predicted mask's.
    scores = evaluate_checkpoint(checkpoint, root, split="val", device="cpu")
    label = label.numpy() > 0.5
    counts = {"tp": int((mask & label).sum()), "fp": int((mask & ~label).sum()),
              "fn": int((~mask & label).sum()), "tn": int((~mask & ~label).sum())}
    tolerance = 0 if kind == "whole" else max(1, int(1e-3 * mask.size))
    assert all(abs(scores[k] - counts[k]) <= tolerance for k in counts), (scores, counts)


def test_blended_tiles_leave_no_seams(tmp_path, monkeypatch):
    """A per-pixel model (the crafted difference model) predicts the same everywhere, so any seam
    would be the tiling's own: a 100x90 scene in tiles of 32 (edge tiles flush with the border)
    must match the whole-image prediction; and no read is larger than a tile."""
    a, b, truth = _scene(100, 90, seed=2, step=40)  # faint change: probabilities far from 0 and 1
    before, after = _pair(tmp_path, a, b)
    checkpoint = difference_checkpoint(tmp_path / "diff.pt", threshold=35)
    reads = []
    original = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        window = kwargs.get("window")
        reads.append(None if window is None else (int(window.height), int(window.width)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    tiled = predict_scene(before, after, tmp_path / "tiled", checkpoint=checkpoint, tile=32, overlap=8,
                          blend="gaussian", tta="none")
    monkeypatch.undo()
    whole = predict_scene(before, after, tmp_path / "whole", checkpoint=checkpoint, tile=128, tta="none")
    assert tiled.tiles == 16 and whole.tiles == 1
    assert None not in reads and max(h for h, _ in reads) <= 32 and max(w for _, w in reads) <= 90
    assert max(w for h, w in reads if h > 1) <= 32  # image tiles; 1-row reads are the overlay's
    p_tiled, p_whole = _read(tiled.probability)[0], _read(whole.probability)[0]
    assert 0.05 < p_whole[truth].mean() < 0.95  # not saturated: a seam would show
    assert np.abs(p_tiled - p_whole).max() < 1e-5
    assert np.array_equal(_read(tiled.mask)[0], _read(whole.mask)[0])


def test_a_wide_scene_in_column_groups_is_the_scene_in_one_go(tmp_path):
    """A tiny accumulator budget forces groups of tile columns (each re-running the tile before
    it): the maps equal those of one accumulator the scene's width, overlay included."""
    from snunet_cbam.predict import column_groups

    a, b, _ = _scene(40, 150, seed=4)
    before, after = _pair(tmp_path, a, b)
    checkpoint = _random_checkpoint(tmp_path / "model.pt", window_size=32, window_overlap=16)
    one = predict_scene(before, after, tmp_path / "one", checkpoint=checkpoint)
    budget_mb = 32 * 56 * 8 / 2**20  # 56 columns: tiles starting 16 apart, two or three to a group
    grouped = predict_scene(before, after, tmp_path / "grouped", checkpoint=checkpoint, max_accumulator_mb=budget_mb)
    xs = [0, 16, 32, 48, 64, 80, 96, 112, 118]
    groups = column_groups(xs, 32, 56)
    assert len(groups) > 3 and all(xs[end - 1] + 32 - xs[first] <= 56 for first, end, _ in groups)
    assert np.abs(_read(one.probability)[0] - _read(grouped.probability)[0]).max() < 1e-5
    assert np.array_equal(_read(one.mask)[0], _read(grouped.mask)[0])
    assert np.array_equal(cv2.imread(str(one.overlay)), cv2.imread(str(grouped.overlay)))


def test_bad_pairs_are_refused_with_the_reason(tmp_path, capsys):
    checkpoint = difference_checkpoint(tmp_path / "diff.pt", threshold=75)
    a, b, _ = _scene(32, 32)
    before = _write_tif(tmp_path / "before.tif", a)
    cases = {
        "size mismatch": _write_tif(tmp_path / "small.tif", b[:, :30]),
        "CRS mismatch": _write_tif(tmp_path / "wgs84.tif", b, crs=CRS.from_epsg(4326)),
        "grid mismatch": _write_tif(tmp_path / "shifted.tif", b, transform=from_origin(500_010.0, 5_000_000.0,
                                                                                        0.5, 0.5)),
        "has 4 band": _write_tif(tmp_path / "rgbn.tif", np.dstack([b, b[..., :1]])),
    }
    for reason, after in cases.items():
        with pytest.raises(ScenePairError, match=reason):
            predict_scene(before, after, tmp_path / "x", checkpoint=checkpoint)
    with pytest.raises(FileNotFoundError, match="after image"):
        predict_scene(before, tmp_path / "missing.tif", tmp_path / "x", checkpoint=checkpoint)
    # The CLI: the reason, exit code 2, no traceback.
    code = main(["predict", "--checkpoint", str(checkpoint), "--before", str(before),
                 "--after", str(cases["CRS mismatch"]), "--out", str(tmp_path / "cli")])
    assert code == 2 and "error: CRS mismatch: before" in capsys.readouterr().err
    code = main(["predict", "--checkpoint", str(checkpoint), "--before", str(before), "--after", str(before),
                 "--out", str(tmp_path / "cli"), "--tile", "32", "--overlap", "32"])
    assert code == 2 and "overlap < tile" in capsys.readouterr().err


def test_cli_predict_writes_the_maps(tmp_path, capsys):
    a, b, truth = _scene(32, 40)
    before, after = _pair(tmp_path, a, b)
    checkpoint = difference_checkpoint(tmp_path / "diff.pt", threshold=75)
    code = main(["predict", "--checkpoint", str(checkpoint), "--before", str(before), "--after", str(after),
                 "--out", str(tmp_path / "maps") + "/", "--threshold", "0.9"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threshold"] == 0.9 and report["mask"].endswith("maps/change_mask.tif")
    assert np.array_equal(_read(report["mask"])[0] == 255, truth)


def test_every_argument_of_every_ml_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name in ("train", "evaluate", "check", "predict", "make-dataset"):
        for action in sub.choices[name]._actions:
            if not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing


def test_a_model_from_the_mlflow_registry(tmp_path):
    """models:/NAME@ALIAS and runs:/ID resolve, in a real MLflow (SQLite store), to the run's
    checkpoint; the map is the checkpoint's."""
    from mlflow import MlflowClient

    from consumer.tracking.model import CHECKPOINT_ARTIFACT
    from snunet_cbam import model_source

    assert model_source.CHECKPOINT_ARTIFACT == CHECKPOINT_ARTIFACT  # where the workers log it
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("predict", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    staged = tmp_path / "staged" / "best.pt"
    difference_checkpoint(staged, threshold=75)
    client.log_artifact(run_id, str(staged), "checkpoint")
    client.create_registered_model("cd")
    version = client.create_model_version("cd", source=f"runs:/{run_id}/checkpoint", run_id=run_id)
    client.set_registered_model_alias("cd", "production", version.version)

    a, b, truth = _scene(32, 32)
    before, after = _pair(tmp_path, a, b)
    for source in ("models:/cd@production", f"models:/cd/{version.version}", f"runs:/{run_id}"):
        result = predict_scene(before, after, tmp_path / source.replace("/", "_").replace(":", "").replace("@", "_"),
                               model=source, tracking_uri=uri)
        assert np.array_equal(_read(result.mask)[0] == 255, truth), source
        assert result.source == source
    with pytest.raises(ModelSourceError, match="staging"):
        Predictor.load(model="models:/cd@staging", tracking_uri=uri)
    with pytest.raises(ModelSourceError, match="expected models:/"):
        Predictor.load(model="s3://bucket/model", tracking_uri=uri)
