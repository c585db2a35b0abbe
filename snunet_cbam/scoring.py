"""Scoring a model on whole images of a split: change-class metrics from summed counts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from schemas.training import TrainConfig

from .hooks import CancelToken
from .inference import Blend, TTA, predict_logits
from .metrics import ConfusionAccumulator, change_mask, confusion_counts
from .panels import PanelTile, ValidationPanel, panel_indices
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


class PanelCapture:
    """Keeps the panel tiles of one validation pass (pass it as ``evaluate_model``'s
    ``on_prediction``): ``count`` images spread over the split (:func:`panels.panel_indices`), each
    with the decision exactly as it was scored (``change_mask`` of the same logits at the same
    threshold). ``images(index)`` gives an image's two dates as displayed (uint8, as decoded);
    tiles larger than ``max_side`` are kept every n-th pixel, so a panel of large scenes stays small.
    Evaluation batches hold one image (whole images differ in size)."""

    def __init__(self, total: int, count: int, images: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 max_side: int = 512) -> None:
        self.indices = frozenset(panel_indices(total, count))
        self.images = images
        self.max_side = max_side
        self.tiles: list[PanelTile] = []
        self.threshold: float | None = None

    def __call__(self, index: int, batch: dict, logits: torch.Tensor, threshold: float) -> None:
        if index not in self.indices:
            return
        truth = (batch["label"][0, 0] > 0.5).cpu().numpy()
        prediction = change_mask(logits[0, 0], threshold).cpu().numpy()
        before, after = self.images(index)
        step = max(1, math.ceil(max(truth.shape) / self.max_side))
        name = batch["name"][0] if "name" in batch else str(index)
        self.tiles.append(PanelTile(name=str(name), before=before[::step, ::step], after=after[::step, ::step],
                                    truth=truth[::step, ::step], prediction=prediction[::step, ::step]))
        self.threshold = threshold

    def panel(self, epoch: int) -> ValidationPanel | None:
        if not self.tiles or self.threshold is None:
            return None
        return ValidationPanel(epoch=epoch, threshold=self.threshold, tiles=tuple(self.tiles))


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device, settings: EvalSettings, *,
                   precision: Precision, loss_fn: nn.Module | None = None, channels_last: bool = False,
                   histogram: ProbabilityHistogram | None = None,
                   on_image: Callable[[int, int], None] | None = None,
                   on_prediction: Callable[[int, dict, torch.Tensor, float], None] | None = None,
                   cancel: CancelToken | None = None) -> dict[str, float]:
    """Metrics of the change class from counts summed over the split, plus the mean loss; the
    per-pixel probabilities go into ``histogram`` too when one is given (threshold tuning).

    ``on_prediction(index, batch, logits, threshold)`` sees every batch's logits as they were
    scored (the validation panels take their tiles from here, so a panel shows what was scored).

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
            if on_prediction is not None:
                on_prediction(i, batch, logits, settings.threshold)
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
