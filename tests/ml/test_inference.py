"""Whole-image prediction: blended windows against whole images, flips, weights."""

import pytest
import torch

from snunet_cbam.checkpoint import model_from_checkpoint
from snunet_cbam.data.dataset import EvalPairDataset, PairLoader
from snunet_cbam.data.layouts import list_split
from snunet_cbam.inference import predict_logits, window_weight


def _tiles(levir_samples):
    dataset = EvalPairDataset(PairLoader(list_split(levir_samples, "demo")), "imagenet")
    return [dataset[i] for i in range(len(dataset))]


def _disagreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a > 0) != (b > 0)).float().mean().item()


@pytest.mark.parametrize("blend", ["gaussian", "linear", "mean"])
def test_window_weights_are_positive_and_peak_in_the_centre(blend):
    w = window_weight(64, blend, torch.device("cpu"))[0, 0]
    assert w.min() > 0
    assert w[32, 32] >= w[0, 0] and w[32, 32] >= w[0, 32]
    if blend != "mean":
        assert w[0, 0] < 0.2 * w[32, 32]


def test_an_image_that_fits_the_window_is_predicted_whole():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(6, 1, 3, padding=1)
    net = lambda a, b: model(torch.cat([a, b], 1))  # noqa: E731
    a, b = torch.randn(1, 3, 40, 48), torch.randn(1, 3, 40, 48)
    whole = predict_logits(net, a, b, window=None, overlap=0)
    assert torch.equal(whole, net(a, b))
    assert torch.equal(predict_logits(net, a, b, window=64, overlap=32), whole)


def test_blended_windows_with_a_large_overlap_match_the_whole_image(trained_run, levir_samples):
    """On 256² tiles that fit whole, 128² windows: the seams of plain averaged windows cost
    agreement with the whole-image prediction; Gaussian blending at half overlap wins it back."""
    out, _ = trained_run
    model, _, _ = model_from_checkpoint(out / "best.pt")
    model.eval()
    seams, blended = [], []
    for tile in _tiles(levir_samples):
        a, b = tile["a"][None], tile["b"][None]
        whole = predict_logits(model, a, b, window=None, overlap=0)
        seams.append(_disagreement(predict_logits(model, a, b, window=128, overlap=0, blend="mean"), whole))
        blended.append(_disagreement(predict_logits(model, a, b, window=128, overlap=64, blend="gaussian"), whole))
    seam_cost, blend_cost = sum(seams) / len(seams), sum(blended) / len(blended)
    assert blend_cost < 0.7 * seam_cost, (blend_cost, seam_cost)
    assert blend_cost < 0.02  # fewer than 2% of pixels decided differently from the whole image


def test_flip_averaging_is_the_mean_of_the_four_flipped_predictions():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 1, 3, padding=1)
    net = lambda a, b: conv(torch.cat([a, b], 1))  # noqa: E731
    a, b = torch.randn(1, 3, 16, 20), torch.randn(1, 3, 16, 20)
    expected = sum(net(a.flip(d), b.flip(d)).flip(d) if d else net(a, b) for d in [(), (3,), (2,), (2, 3)]) / 4
    got = predict_logits(net, a, b, window=None, overlap=0, tta="flip")
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, net(a, b), atol=1e-3)  # the flips did change something
