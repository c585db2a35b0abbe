"""An exponential moving average of the weights, validated, checkpointed and exported instead of
the raw weights when ``ema_decay`` is set.

The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so early averages
are not dominated by the random initialisation. BatchNorm statistics are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEma:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged = [p for p in self.model.parameters()]
        current = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - d)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
