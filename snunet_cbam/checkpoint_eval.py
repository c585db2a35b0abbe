"""Scoring a saved checkpoint on a split of a dataset (``cdtrain evaluate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from .checkpoint import model_from_checkpoint
from .data.check import InvalidDatasetError, check_pairs
from .data.dataset import EvalPairDataset, PairLoader
from .data.layouts import list_split
from .scoring import evaluate_model
from .runtime import Precision, select_device


def evaluate_checkpoint(checkpoint: Path | str, data_root: Path | str, split: str = "test",
                        device: str | None = None) -> dict[str, Any]:
    model, config, state = model_from_checkpoint(checkpoint)
    torch_device = select_device(device or config.device)
    report = check_pairs(list_split(data_root, split), split)
    if not report.valid or (not report.ok and not config.skip_invalid):
        raise InvalidDatasetError([report])
    loader = DataLoader(EvalPairDataset(PairLoader(report.valid), config.normalize), batch_size=1)
    model = model.to(torch_device)
    metrics = evaluate_model(model, loader, torch_device, window=config.window_size, overlap=config.window_overlap,
                             threshold=config.threshold, precision=Precision.choose(torch_device, config.amp))
    return {"split": split, "checkpoint": str(checkpoint), "epoch": state["epoch"], "pairs": len(report.valid),
            "skipped": [p.name for p in report.problems], **metrics}
