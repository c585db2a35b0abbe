"""Learning-rate schedules with linear warm-up, stepped per iteration.

A run resumed with more (or fewer) ``epochs`` has a new length. Recomputing the decay over the new
length would make the learning rate jump (up, when the run grows); instead the schedule is
*anchored* where the run resumed: from that step it decays from the learning rate it had reached
to the floor over the steps that remain, with the same shape and no second warm-up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True)
class ScheduleAnchor:
    step: int  # 0-based step from which the decay restarts
    factor: float  # multiplier of base_lr reached at that step

    def as_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, *, kind: str, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float,
              poly_power: float = 1.0, step_every: int = 1, step_gamma: float = 0.1,
              anchor: ScheduleAnchor | None = None) -> float:
    """Multiplier of ``base_lr`` at ``step`` (0-based)."""
    floor = min_lr / base_lr
    if kind == "constant":
        return 1.0 if not (warmup_steps and step < warmup_steps) else (step + 1) / warmup_steps
    if kind == "step":
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(step_gamma ** (step // step_every), floor)
    if kind not in ("poly", "cosine"):
        raise ValueError(f"unknown scheduler '{kind}'")
    if anchor is not None and step >= anchor.step:
        start, start_factor = anchor.step, anchor.factor
    elif warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    else:
        start, start_factor = warmup_steps, 1.0
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    if kind == "poly":
        decay = (1.0 - progress) ** poly_power
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (start_factor - floor) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int, warmup_ratio: float,
                    base_lr: float, min_lr: float, poly_power: float, steps_per_epoch: int,
                    step_size_epochs: int, step_gamma: float, anchor: ScheduleAnchor | None = None) -> LambdaLR:
    warmup_steps = int(round(warmup_ratio * total_steps))
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, kind=kind, total_steps=total_steps, warmup_steps=warmup_steps, base_lr=base_lr,
            min_lr=min_lr, poly_power=poly_power, step_every=step_size_epochs * steps_per_epoch,
            step_gamma=step_gamma, anchor=anchor,
        ),
    )
