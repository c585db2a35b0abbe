"""Change-class metrics from confusion counts.

Counts are accumulated on the device (no host sync per batch); epoch metrics come from the summed
counts, never from averaging per-batch scores. When a ratio is 0/0 (a tile with no change and no
predicted change) the score is 1.0: nothing was there and nothing was found (scikit-learn's
``zero_division=1``). F1 and IoU still fall to 0 when change is missed or invented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METRIC_NAMES = ("f1", "iou", "precision", "recall", "accuracy")


def change_mask(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The decision: change where the probability is above ``threshold``. Scoring and prediction
    both use this, so a predicted map is the map that was scored."""
    return torch.sigmoid(logits.float()) > threshold


def confusion_counts(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``[tp, fp, fn, tn]`` as an int64 tensor on the logits' device."""
    pred = change_mask(logits, threshold)
    truth = target > 0.5
    tp = (pred & truth).sum()
    fp = (pred & ~truth).sum()
    fn = (~pred & truth).sum()
    tn = (~pred & ~truth).sum()
    return torch.stack([tp, fp, fn, tn]).to(torch.int64)


def _ratio(num: int, den: int) -> float:
    return num / den if den else 1.0


@dataclass(frozen=True)
class ChangeMetrics:
    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def from_counts(cls, counts: torch.Tensor | list[int] | tuple[int, ...]) -> "ChangeMetrics":
        values = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        tp, fp, fn, tn = (int(v) for v in values)
        return cls(tp, fp, fn, tn)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def iou(self) -> float:
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in METRIC_NAMES}


class ConfusionAccumulator:
    """Sums confusion counts over an epoch without leaving the device."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.counts = torch.zeros(4, dtype=torch.int64, device=device)

    def update(self, counts: torch.Tensor) -> None:
        self.counts += counts

    def compute(self) -> ChangeMetrics:
        return ChangeMetrics.from_counts(self.counts)
