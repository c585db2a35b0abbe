"""Whole-image prediction by sliding window, so 1024² originals are scored whole at any size the
model was trained on. Overlapping windows average their logits."""

from __future__ import annotations

import torch
from torch import nn


def window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)  # the last window sits flush with the edge
    return starts


@torch.no_grad()
def sliding_window_logits(model: nn.Module, a: torch.Tensor, b: torch.Tensor, window: int, overlap: int,
                          windows_per_batch: int = 8) -> torch.Tensor:
    """Logits ``(N, 1, H, W)`` for images ``(N, 3, H, W)``; images smaller than the window go whole."""
    n, _, height, width = a.shape
    stride = window - overlap
    tiles = [(y, x) for y in window_starts(height, window, stride) for x in window_starts(width, window, stride)]
    if len(tiles) == 1:
        return model(a, b).float()

    logits = a.new_zeros((n, 1, height, width), dtype=torch.float32)
    weight = a.new_zeros((1, 1, height, width), dtype=torch.float32)
    for i in range(0, len(tiles), windows_per_batch):
        chunk = tiles[i : i + windows_per_batch]
        crops_a = torch.cat([a[..., y : y + window, x : x + window] for y, x in chunk])
        crops_b = torch.cat([b[..., y : y + window, x : x + window] for y, x in chunk])
        out = model(crops_a, crops_b).float()
        for k, (y, x) in enumerate(chunk):
            logits[..., y : y + window, x : x + window] += out[k * n : (k + 1) * n]
            weight[..., y : y + window, x : x + window] += 1
    return logits / weight
