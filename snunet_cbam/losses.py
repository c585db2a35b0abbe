"""Hybrid change-detection loss: ``weight_bce * BCE + weight_dice * soft Dice``.

BCE alone lets the many unchanged pixels dominate; Dice scores the change class directly.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Sums a tensor over every process of a data-parallel run, with gradients (the global batch's sums).
BatchSum = Callable[[torch.Tensor], torch.Tensor]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                   batch_sum: BatchSum | None = None) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum p + sum t + s)`` over the whole batch, p = sigmoid(logits).

    Summing over the batch (not per image) keeps tiles without change from dividing by ~0. With
    ``batch_sum`` (data parallel) the sums run over the global batch of every process, so the loss
    is the single-process loss of that batch, not a mean of per-process Dice scores.
    """
    probs = torch.sigmoid(logits.float())
    target = target.float()
    sums = torch.stack([(probs * target).sum(), probs.sum(), target.sum()])
    if batch_sum is not None:
        sums = batch_sum(sums)
    intersection, prob_sum, target_sum = sums.unbind()
    return 1.0 - (2.0 * intersection + smooth) / (prob_sum + target_sum + smooth)


class HybridLoss(nn.Module):
    def __init__(self, weight_bce: float = 1.0, weight_dice: float = 1.0, pos_weight: float | None = None,
                 smooth: float = 1.0) -> None:
        super().__init__()
        self.weight_bce = weight_bce
        self.weight_dice = weight_dice
        self.smooth = smooth
        self.batch_sum: BatchSum | None = None  # set by data-parallel training (distributed.py)
        # A buffer so that .to(device) moves it with the module.
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor([pos_weight]))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float()
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.weight_bce:
            bce = F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=self.pos_weight)
            loss = loss + self.weight_bce * bce
        if self.weight_dice:
            loss = loss + self.weight_dice * soft_dice_loss(logits, target, self.smooth, self.batch_sum)
        return loss
