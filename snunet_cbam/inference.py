"""Whole-image prediction: whole when the image fits the window, else overlapping windows blended
with a weight that falls towards each window's border, so window seams cost nothing.

A window's border pixels see the least context, and averaging windows with equal weight (``mean``)
lets them pull the seam pixels; a Gaussian (or linear) weight lets the centre of the neighbouring
window decide there instead. Optional flip test-time augmentation averages the logits of the
image and its horizontal, vertical and double flips.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
from torch import nn

Blend = Literal["gaussian", "linear", "mean"]
TTA = Literal["none", "flip"]

# Flips as dims of an (N, C, H, W) tensor: identity, horizontal, vertical, both.
_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)  # the last window sits flush with the edge
    return starts


@lru_cache(maxsize=8)
def _weight_1d(window: int, blend: Blend) -> torch.Tensor:
    centre = (window - 1) / 2
    x = torch.arange(window, dtype=torch.float32)
    if blend == "gaussian":
        sigma = window / 8  # nnU-Net's choice: the border weighs ~e^-8 of the centre, never 0
        return torch.exp(-((x - centre) ** 2) / (2 * sigma**2)).clamp_min(1e-4)
    if blend == "linear":
        return torch.minimum(x + 1, window - x) / ((window + 1) / 2)  # a tent, > 0 at the borders
    if blend == "mean":
        return torch.ones(window)
    raise ValueError(f"unknown window blend {blend!r}")


def window_weight(window: int, blend: Blend, device: torch.device) -> torch.Tensor:
    """``(1, 1, window, window)`` weight of each pixel of a window in the blend."""
    w = _weight_1d(window, blend)
    return (w[:, None] * w[None, :]).view(1, 1, window, window).to(device)


def forward_tta(model: nn.Module, a: torch.Tensor, b: torch.Tensor, tta: TTA) -> torch.Tensor:
    """Logits of one batch of windows (or whole images), with the flips of ``tta`` averaged."""
    if tta == "none":
        return model(a, b).float()
    if tta != "flip":
        raise ValueError(f"unknown test-time augmentation {tta!r}")
    total = None
    for dims in _FLIPS:
        if dims:
            out = model(a.flip(dims), b.flip(dims)).float().flip(dims)
        else:
            out = model(a, b).float()
        total = out if total is None else total + out
    return total / len(_FLIPS)


@torch.no_grad()
def predict_logits(model: nn.Module, a: torch.Tensor, b: torch.Tensor, *, window: int | None, overlap: int,
                   blend: Blend = "gaussian", tta: TTA = "none", windows_per_batch: int = 8) -> torch.Tensor:
    """Change logits ``(N, 1, H, W)`` for images ``(N, C, H, W)``.

    ``window=None``, or an image no larger than the window, is predicted whole (the published
    protocol on 1024² LEVIR-CD images); a larger one by windows ``overlap`` pixels apart, blended.
    """
    n, _, height, width = a.shape
    if window is None or (height <= window and width <= window):
        return forward_tta(model, a, b, tta)

    stride = window - overlap
    tiles = [(y, x) for y in window_starts(height, window, stride) for x in window_starts(width, window, stride)]
    win_h, win_w = min(window, height), min(window, width)
    weight_tile = window_weight(window, blend, a.device)[..., :win_h, :win_w]
    logits = a.new_zeros((n, 1, height, width), dtype=torch.float32)
    weight = a.new_zeros((1, 1, height, width), dtype=torch.float32)
    for i in range(0, len(tiles), windows_per_batch):
        chunk = tiles[i : i + windows_per_batch]
        crops_a = torch.cat([a[..., y : y + win_h, x : x + win_w] for y, x in chunk])
        crops_b = torch.cat([b[..., y : y + win_h, x : x + win_w] for y, x in chunk])
        out = forward_tta(model, crops_a, crops_b, tta)
        for k, (y, x) in enumerate(chunk):
            logits[..., y : y + win_h, x : x + win_w] += out[k * n : (k + 1) * n] * weight_tile
            weight[..., y : y + win_h, x : x + win_w] += weight_tile
    return logits / weight
