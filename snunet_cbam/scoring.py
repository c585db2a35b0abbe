"""Scoring a model on whole images of a split."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from .inference import sliding_window_logits
from .metrics import ConfusionAccumulator, confusion_counts
from .runtime import Precision


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device, *, window: int, overlap: int,
                   threshold: float, precision: Precision, loss_fn: nn.Module | None = None,
                   channels_last: bool = False, on_image: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Metrics of the change class from counts summed over the split, plus the mean loss."""
    was_training = model.training
    model.eval()
    confusion = ConfusionAccumulator(device)
    loss_sum = torch.zeros((), device=device)
    images = 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for i, batch in enumerate(loader):
            a = batch["a"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            b = batch["b"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            label = batch["label"].to(device, non_blocking=True)
            with precision.autocast(device):
                logits = sliding_window_logits(model, a, b, window, overlap)
            confusion.update(confusion_counts(logits, label, threshold))
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
