"""Learning-rate schedules with linear warm-up, stepped per iteration."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, *, kind: str, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float,
              poly_power: float = 1.0, step_every: int = 1, step_gamma: float = 0.1) -> float:
    """Multiplier of ``base_lr`` at ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    floor = min_lr / base_lr
    if kind == "constant":
        return 1.0
    if kind == "step":
        return max(step_gamma ** (step // step_every), floor)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "poly":
        decay = (1.0 - progress) ** poly_power
    elif kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown scheduler '{kind}'")
    return floor + (1.0 - floor) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int, warmup_ratio: float,
                    base_lr: float, min_lr: float, poly_power: float, steps_per_epoch: int,
                    step_size_epochs: int, step_gamma: float) -> LambdaLR:
    warmup_steps = int(round(warmup_ratio * total_steps))
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, kind=kind, total_steps=total_steps, warmup_steps=warmup_steps, base_lr=base_lr,
            min_lr=min_lr, poly_power=poly_power, step_every=step_size_epochs * steps_per_epoch,
            step_gamma=step_gamma,
        ),
    )
