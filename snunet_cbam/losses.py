"""Hybrid change-detection loss: ``weight_bce * BCE + weight_dice * soft Dice``.

BCE alone lets the many unchanged pixels dominate; Dice scores the change class directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum p + sum t + s)`` over the whole batch, p = sigmoid(logits).

    Summing over the batch (not per image) keeps tiles without change from dividing by ~0.
    """
    probs = torch.sigmoid(logits.float())
    target = target.float()
    intersection = (probs * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (probs.sum() + target.sum() + smooth)


class HybridLoss(nn.Module):
    def __init__(self, weight_bce: float = 1.0, weight_dice: float = 1.0, pos_weight: float | None = None,
                 smooth: float = 1.0) -> None:
        super().__init__()
        self.weight_bce = weight_bce
        self.weight_dice = weight_dice
        self.smooth = smooth
        # A buffer so that .to(device) moves it with the module.
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor([pos_weight]))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float()
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.weight_bce:
            bce = F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=self.pos_weight)
            loss = loss + self.weight_bce * bce
        if self.weight_dice:
            loss = loss + self.weight_dice * soft_dice_loss(logits, target, self.smooth)
        return loss
