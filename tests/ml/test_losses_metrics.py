import math

import pytest
import torch

from snunet_cbam.losses import HybridLoss, soft_dice_loss
from snunet_cbam.metrics import ChangeMetrics, ConfusionAccumulator, confusion_counts


def test_dice_against_hand_computed_value():
    # p = sigmoid(0) = 0.5 everywhere on 4 pixels, 1 of which is change:
    # dice = (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5 → loss 0.5
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.5)


def test_hybrid_loss_weights_bce_and_dice():
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    bce = math.log(2.0)  # -log(0.5) for every pixel
    assert HybridLoss(1.0, 0.0)(logits, target).item() == pytest.approx(bce)
    assert HybridLoss(0.0, 1.0)(logits, target).item() == pytest.approx(0.5)
    assert HybridLoss(0.3, 2.0)(logits, target).item() == pytest.approx(0.3 * bce + 2.0 * 0.5)


def test_positive_class_weight_scales_the_change_pixels_bce():
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # mean over 4 pixels of [3 * log2, log2, log2, log2] = 6/4 log2
    assert HybridLoss(1.0, 0.0, pos_weight=3.0)(logits, target).item() == pytest.approx(1.5 * math.log(2))


def test_confusion_counts_and_scores():
    logits = torch.tensor([[[[5.0, 5.0, -5.0, -5.0], [5.0, -5.0, -5.0, -5.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]]])
    counts = confusion_counts(logits, target)
    assert counts.tolist() == [2, 1, 1, 4]
    m = ChangeMetrics.from_counts(counts)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.iou == pytest.approx(0.5)
    assert m.accuracy == pytest.approx(6 / 8)


def test_epoch_metrics_come_from_summed_counts_not_averaged_scores():
    acc = ConfusionAccumulator()
    acc.update(torch.tensor([1, 0, 0, 10]))    # batch F1 = 1.0
    acc.update(torch.tensor([1, 3, 5, 0]))     # batch F1 = 2/10
    assert acc.compute().f1 == pytest.approx(4 / (4 + 3 + 5))  # not (1.0 + 0.2) / 2


def test_tile_without_change_gives_no_nan():
    empty = ChangeMetrics(tp=0, fp=0, fn=0, tn=100)
    assert empty.as_dict() == {"f1": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0}
    false_alarm = ChangeMetrics(tp=0, fp=5, fn=0, tn=95)
    values = false_alarm.as_dict()
    assert not any(math.isnan(v) for v in values.values())
    assert values["f1"] == 0.0 and values["precision"] == 0.0 and values["recall"] == 1.0
    missed = ChangeMetrics(tp=0, fp=0, fn=5, tn=95)
    # Nothing predicted: no false alarm (precision 0/0 → 1), but every change missed.
    assert missed.precision == 1.0 and missed.recall == 0.0 and missed.f1 == 0.0 and missed.iou == 0.0
