"""Scoring a model on whole images of a split: change-class metrics from summed counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from schemas.training import TrainConfig

from .hooks import CancelToken
from .inference import Blend, TTA, predict_logits
from .metrics import ConfusionAccumulator, confusion_counts
from .runtime import Precision
from .thresholds import ProbabilityHistogram


class EvaluationStopped(Exception):
    """``evaluate_model``'s cancel token was set before every image was scored: no metrics."""


@dataclass(frozen=True)
class EvalSettings:
    """How images are predicted and scored: the evaluation keys of a TrainConfig."""

    window: int | None
    overlap: int
    blend: Blend
    tta: TTA
    threshold: float

    @classmethod
    def from_config(cls, config: TrainConfig, *, tta: bool = False, threshold: float | None = None) -> "EvalSettings":
        """``tta=False`` leaves flips out (per-epoch validation); the final passes take the config's."""
        return cls(window=config.window_size, overlap=config.window_overlap, blend=config.window_blend,
                   tta=config.tta if tta else "none",
                   threshold=config.threshold if threshold is None else threshold)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device, settings: EvalSettings, *,
                   precision: Precision, loss_fn: nn.Module | None = None, channels_last: bool = False,
                   histogram: ProbabilityHistogram | None = None,
                   on_image: Callable[[int, int], None] | None = None,
                   cancel: CancelToken | None = None) -> dict[str, float]:
    """Metrics of the change class from counts summed over the split, plus the mean loss; the
    per-pixel probabilities go into ``histogram`` too when one is given (threshold tuning).

    ``cancel`` is checked before each batch; once set, :class:`EvaluationStopped` is raised
    (metrics of part of a split would be wrong, not approximate)."""
    was_training = model.training
    model.eval()
    confusion = ConfusionAccumulator(device)
    loss_sum = torch.zeros((), device=device)
    images = 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for i, batch in enumerate(loader):
            if cancel is not None and cancel.is_set():
                raise EvaluationStopped(f"stopped after {i} of {len(loader)} images")
            a = batch["a"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            b = batch["b"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            label = batch["label"].to(device, non_blocking=True)
            with precision.autocast(device):
                logits = predict_logits(model, a, b, window=settings.window, overlap=settings.overlap,
                                        blend=settings.blend, tta=settings.tta)
            confusion.update(confusion_counts(logits, label, settings.threshold))
            if histogram is not None:
                histogram.update(logits, label)
            if loss_fn is not None:
                loss_sum += loss_fn(logits, label) * a.shape[0]
            images += a.shape[0]
            if on_image is not None:
                on_image(i + 1, len(loader))
    finally:
        model.train(was_training)
    metrics = confusion.compute()
    result = metrics.as_dict()
    if loss_fn is not None:
        result["loss"] = float(loss_sum) / max(images, 1)
    result.update(tp=metrics.tp, fp=metrics.fp, fn=metrics.fn, tn=metrics.tn)
    return result
