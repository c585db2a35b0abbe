"""The decision threshold with the best F1, from one pass over the validation split.

Per-pixel change probabilities are counted into fine bins, separately for change and no-change
pixels, on the device; the F1 of every candidate threshold then follows from cumulative sums, with
no second pass. The chosen threshold travels with the checkpoint and the exported model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .metrics import ChangeMetrics

BINS = 1000
# A tuned threshold stays inside this range: at the extremes a single bin decides, which says more
# about the validation split than about the model.
LOWEST, HIGHEST = 0.02, 0.98


@dataclass(frozen=True)
class TunedThreshold:
    threshold: float
    metrics: ChangeMetrics  # validation counts at that threshold

    def as_dict(self) -> dict[str, float]:
        return {"threshold": self.threshold, **self.metrics.as_dict()}


class ProbabilityHistogram:
    """Counts of change and no-change pixels per probability bin; ``update`` never leaves the device."""

    def __init__(self, device: torch.device | str = "cpu", bins: int = BINS) -> None:
        self.bins = bins
        self.change = torch.zeros(bins, dtype=torch.int64, device=device)
        self.no_change = torch.zeros(bins, dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        index = (torch.sigmoid(logits.float()) * self.bins).long().clamp_(0, self.bins - 1).flatten()
        truth = (target > 0.5).flatten()
        self.change += torch.bincount(index[truth], minlength=self.bins)
        self.no_change += torch.bincount(index[~truth], minlength=self.bins)

    def counts_at(self, threshold: float) -> ChangeMetrics:
        """Confusion counts when pixels in bins at or above ``threshold`` are called change."""
        k = int(round(threshold * self.bins))
        tp, fp = int(self.change[k:].sum()), int(self.no_change[k:].sum())
        fn, tn = int(self.change[:k].sum()), int(self.no_change[:k].sum())
        return ChangeMetrics(tp, fp, fn, tn)

    def curve(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tp, fp, fn, f1`` (float64, one per bin) when bin k's threshold ``k / bins`` decides:
        change is predicted in every bin >= k, so the counts are suffix sums."""
        tp = self.change.flip(0).cumsum(0).flip(0).double()
        fp = self.no_change.flip(0).cumsum(0).flip(0).double()
        fn = self.change.sum() - tp
        f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.ones_like(tp))
        return tp, fp, fn, f1

    def best(self) -> TunedThreshold:
        """The threshold with the highest F1; among equals, the one nearest 0.5."""
        _, _, _, f1 = self.curve()
        candidates = torch.arange(self.bins, device=f1.device)
        allowed = (candidates >= round(LOWEST * self.bins)) & (candidates <= round(HIGHEST * self.bins))
        f1 = torch.where(allowed, f1, torch.full_like(f1, -1.0))
        # Highest F1 first, then the distance from 0.5 as a tie-breaker.
        distance = (candidates - self.bins / 2).abs().double() / self.bins
        k = int(torch.argmax(f1 - 1e-9 * distance))
        threshold = k / self.bins
        return TunedThreshold(threshold, self.counts_at(threshold))


def pr_curve_document(histogram: ProbabilityHistogram, threshold: float) -> dict:
    """The precision-recall curve of the histogram's pixels (one point per bin edge, as the
    threshold tuning sees them) and the point of ``threshold``: JSON-ready, for the run's
    artifacts. Precision with nothing predicted is 1.0, as in :mod:`metrics`."""
    tp, fp, _, f1 = (values.cpu() for values in histogram.curve())
    positives = float(histogram.change.sum())
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.ones_like(tp))
    recall = tp / positives if positives else torch.ones_like(tp)
    chosen = histogram.counts_at(threshold)

    def rounded(values: torch.Tensor) -> list[float]:
        return [round(v, 6) for v in values.tolist()]

    return {
        "threshold": threshold,
        "bins": histogram.bins,
        "pixels": {"change": int(positives), "no_change": int(histogram.no_change.sum())},
        "chosen": {"threshold": threshold, "precision": chosen.precision, "recall": chosen.recall, "f1": chosen.f1},
        "curve": {"threshold": [k / histogram.bins for k in range(histogram.bins)], "precision": rounded(precision),
                  "recall": rounded(recall), "f1": rounded(f1)},
    }


def confusion_document(metrics: ChangeMetrics, threshold: float) -> dict:
    """The 2 x 2 confusion matrix (rows: truth no change / change; columns: prediction), as counts
    and as shares of each true class."""
    counts = [[metrics.tn, metrics.fp], [metrics.fn, metrics.tp]]
    normalized = [[v / sum(row) if sum(row) else 0.0 for v in row] for row in counts]
    return {"threshold": threshold, "labels": ["no change", "change"], "counts": counts, "normalized": normalized,
            "tp": metrics.tp, "fp": metrics.fp, "fn": metrics.fn, "tn": metrics.tn, **metrics.as_dict()}
