"""One optimisation step exactly as the trainer runs it (memory format, autocast, compile, scaler).

Kept apart from the training loop so that ``bench/train_step.py`` measures the very same path.
"""

from __future__ import annotations

import torch
from torch import nn

from .runtime import Precision


class TrainStep:
    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, precision: Precision, channels_last: bool, compile: bool) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.device = device
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.to(device=device, memory_format=self.memory_format)
        self.forward = torch.compile(model) if compile else model
        self.compiled = compile
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = batch["a"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        b = batch["b"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return a, b, batch["label"].to(self.device, non_blocking=True)

    def __call__(self, a: torch.Tensor, b: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward and optimiser update; returns the detached loss and logits."""
        with self.precision.autocast(self.device):
            logits = self.forward(a, b)
        loss = self.loss_fn(logits, label)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach()
