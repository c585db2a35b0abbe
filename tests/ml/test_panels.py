"""Validation panels and curves, rendered from crafted arrays (no MLflow)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from snunet_cbam.data.dataset import EvalPairDataset, PairLoader
from snunet_cbam.data.layouts import list_split
from snunet_cbam.metrics import ChangeMetrics
from snunet_cbam.panels import (CELL, FN_COLOUR, FP_COLOUR, TN_COLOUR, TP_COLOUR, PanelTile, cell_origin,
                                outcome_map, panel_indices, render_confusion_matrix, render_panel, render_pr_curve)
from snunet_cbam.runtime import Precision
from snunet_cbam.scoring import EvalSettings, PanelCapture, evaluate_model
from snunet_cbam.synthetic import make_synthetic_dataset
from snunet_cbam.thresholds import ProbabilityHistogram, confusion_document, pr_curve_document

# A 2 x 2 case with one pixel of each outcome: row 0 = (TP, FN), row 1 = (FP, TN).
TRUTH = np.array([[1, 1], [0, 0]], dtype=bool)
PREDICTION = np.array([[1, 0], [1, 0]], dtype=bool)


def test_outcome_map_colours_each_outcome() -> None:
    out = outcome_map(TRUTH, PREDICTION)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert [tuple(out[0, 0]), tuple(out[0, 1]), tuple(out[1, 0]), tuple(out[1, 1])] == [
        TP_COLOUR, FN_COLOUR, FP_COLOUR, TN_COLOUR]
    # Four distinct colours: no outcome can be mistaken for another.
    assert len({TP_COLOUR, FP_COLOUR, FN_COLOUR, TN_COLOUR}) == 4
    with pytest.raises(ValueError):
        outcome_map(TRUTH, PREDICTION[:1])


def test_panel_pixels_match_the_outcomes_of_a_crafted_tile() -> None:
    before = np.full((2, 2, 3), (10, 20, 30), dtype=np.uint8)
    after = np.full((2, 2, 3), (200, 100, 50), dtype=np.uint8)
    other = PanelTile("other.png", after, before, ~TRUTH, ~PREDICTION)
    panel = render_panel([other, PanelTile("crafted.png", before, after, TRUTH, PREDICTION)], title="epoch 3")
    assert panel.size[0] == cell_origin(0, 3)[0] + CELL + 4  # four columns, then the border

    def colour(row: int, column: int, y: int, x: int) -> tuple[int, int, int]:
        """The centre of source pixel (y, x) of a 2 x 2 picture, scaled to a cell."""
        ox, oy = cell_origin(row, column)
        return panel.getpixel((ox + x * CELL // 2 + CELL // 4, oy + y * CELL // 2 + CELL // 4))

    # Row 1 is the crafted tile: before and after as they were, truth white on black.
    assert colour(1, 0, 0, 0) == (10, 20, 30) and colour(1, 1, 1, 1) == (200, 100, 50)
    assert [colour(1, 2, y, x) for y, x in ((0, 0), (0, 1), (1, 0), (1, 1))] == [
        (255, 255, 255), (255, 255, 255), (0, 0, 0), (0, 0, 0)]
    # The prediction: TP white, FN green, FP magenta, TN black, where each pixel is.
    assert [colour(1, 3, y, x) for y, x in ((0, 0), (0, 1), (1, 0), (1, 1))] == [
        TP_COLOUR, FN_COLOUR, FP_COLOUR, TN_COLOUR]
    # Row 0 is the inverted tile: every outcome swaps (TP <-> TN, FN <-> FP).
    assert [colour(0, 3, y, x) for y, x in ((0, 0), (0, 1), (1, 0), (1, 1))] == [
        TN_COLOUR, FP_COLOUR, FN_COLOUR, TP_COLOUR]
    assert PanelTile("crafted.png", before, after, TRUTH, PREDICTION).counts() == (1, 1, 1, 1)


def test_panel_of_a_non_square_multiband_tile_keeps_outcomes_by_nearest_neighbour() -> None:
    # 4 bands (RGB + near infrared), 6 x 3: the first three bands are shown, masks are not blurred.
    image = np.zeros((6, 3, 4), dtype=np.uint8)
    image[..., 3] = 255
    truth = np.zeros((6, 3), bool)
    truth[:3] = True
    panel = np.asarray(render_panel([PanelTile("tall", image, image, truth, truth)]))
    ox, oy = cell_origin(0, 3)
    cell = panel[oy : oy + CELL, ox : ox + CELL].reshape(-1, 3)
    colours = {tuple(c) for c in cell}
    # Outcome colours and the background only: nearest-neighbour scaling mixes no colours.
    assert colours <= {TP_COLOUR, TN_COLOUR, (40, 40, 40)}
    assert TP_COLOUR in colours and TN_COLOUR in colours
    assert tuple(panel[oy + CELL // 2, cell_origin(0, 0)[0] + CELL // 2]) == (0, 0, 0)  # NIR is not shown


def test_panel_indices_are_fixed_and_spread_over_the_split() -> None:
    assert panel_indices(100, 4) == [0, 25, 50, 75]
    assert panel_indices(100, 4) == panel_indices(100, 4)
    assert panel_indices(3, 4) == [0, 1, 2]
    assert panel_indices(10, 0) == [] and panel_indices(0, 4) == []
    assert len(panel_indices(7, 3)) == 3


class _Difference(nn.Module):
    """Logits from the red band's difference: a fixed, known decision per pixel."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b[:, :1] - a[:, :1]) * 4.0


def test_panel_tiles_are_the_decisions_that_were_scored(tmp_path) -> None:
    root = make_synthetic_dataset(tmp_path / "data", pairs=8, size=48, seed=1).root
    pairs = PairLoader(list_split(root, "train"))
    loader = DataLoader(EvalPairDataset(pairs, "imagenet"), batch_size=1)
    capture = PanelCapture(len(pairs), len(pairs), lambda i: pairs[i][:2])
    metrics = evaluate_model(_Difference(), loader, torch.device("cpu"), EvalSettings(None, 0, "mean", "none", 0.3),
                             precision=Precision.choose(torch.device("cpu"), False), on_prediction=capture)
    panel = capture.panel(epoch=2)
    assert panel is not None and panel.epoch == 2 and panel.threshold == 0.3
    assert [t.name for t in panel.tiles] == [p.name for p in pairs.pairs]
    # Every tile captured: their outcomes add up to the split's counts, pixel for pixel.
    totals = np.sum([t.counts() for t in panel.tiles], axis=0).tolist()
    assert totals == [metrics["tp"], metrics["fp"], metrics["fn"], metrics["tn"]]
    assert metrics["fp"] > 0 and metrics["fn"] > 0  # the crafted model errs both ways
    a, b, mask = pairs[0]
    assert np.array_equal(panel.tiles[0].before, a) and np.array_equal(panel.tiles[0].truth, mask > 0)

    # Two of them: spread over the split (the first and the middle one), the same on every pass.
    few = PanelCapture(len(pairs), 2, lambda i: pairs[i][:2])
    evaluate_model(_Difference(), loader, torch.device("cpu"), EvalSettings(None, 0, "mean", "none", 0.3),
                   precision=Precision.choose(torch.device("cpu"), False), on_prediction=few)
    assert [t.name for t in few.tiles] == [pairs.pairs[0].name, pairs.pairs[len(pairs) // 2].name]


def test_large_tiles_are_kept_at_a_bounded_size() -> None:
    capture = PanelCapture(1, 1, lambda i: (np.zeros((1000, 600, 3), np.uint8),) * 2, max_side=256)
    logits = torch.zeros(1, 1, 1000, 600)
    capture(0, {"label": torch.zeros(1, 1, 1000, 600), "name": ["big.tif"]}, logits, 0.5)
    tile = capture.tiles[0]
    assert max(tile.truth.shape) <= 256 and tile.before.shape[:2] == tile.truth.shape == tile.prediction.shape


def _histogram() -> ProbabilityHistogram:
    generator = torch.Generator().manual_seed(0)
    target = (torch.rand(1, 1, 64, 64, generator=generator) > 0.8).float()
    logits = (target * 2 - 1) * 1.5 + torch.randn(1, 1, 64, 64, generator=generator)
    histogram = ProbabilityHistogram()
    histogram.update(logits, target)
    return histogram


def test_pr_curve_document_marks_the_tuned_threshold() -> None:
    histogram = _histogram()
    tuned = histogram.best()
    document = pr_curve_document(histogram, tuned.threshold)
    assert document["threshold"] == document["chosen"]["threshold"] == tuned.threshold
    assert document["chosen"]["f1"] == pytest.approx(tuned.metrics.f1)
    curve = document["curve"]
    assert len(curve["threshold"]) == len(curve["precision"]) == len(curve["recall"]) == histogram.bins
    k = round(tuned.threshold * histogram.bins)
    assert curve["recall"][k] == pytest.approx(tuned.metrics.recall, abs=1e-6)
    assert curve["recall"][0] == 1.0 and curve["recall"] == sorted(curve["recall"], reverse=True)
    # The tuned threshold's F1 is the curve's best inside the allowed range.
    assert max(curve["f1"][20:981]) == pytest.approx(tuned.metrics.f1, abs=1e-6)
    assert Image.open(io.BytesIO(render_pr_curve(document))).format == "PNG"


def test_confusion_document_counts_and_shares() -> None:
    document = confusion_document(ChangeMetrics(tp=30, fp=10, fn=20, tn=140), 0.4)
    assert document["counts"] == [[140, 10], [20, 30]]
    assert document["normalized"] == [[140 / 150, 10 / 150], [20 / 50, 30 / 50]]
    assert document["f1"] == pytest.approx(60 / 90)
    image = Image.open(io.BytesIO(render_confusion_matrix(document)))
    assert image.format == "PNG" and image.size[0] > 100
