"""Scoring a saved checkpoint on a split of a dataset (``cdtrain evaluate``, and the registry's
champion-against-challenger comparison)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from schemas.training import TrainConfig

from .checkpoint import decision_threshold, model_from_checkpoint
from .data.check import InvalidDatasetError, check_pairs
from .data.dataset import EvalPairDataset, PairLoader
from .data.layouts import list_split
from .runtime import Precision, select_device
from .scoring import EvalSettings, evaluate_model


def evaluate_checkpoint(checkpoint: Path | str, data_root: Path | str, split: str = "test", *,
                        device: str | None = None, settings: TrainConfig | None = None) -> dict[str, Any]:
    """Metrics of the checkpoint's model on ``split``, at its own decision threshold.

    ``settings``: a config whose evaluation keys (window, blend, flips, label threshold,
    skip_invalid) replace the checkpoint's, so that two models are scored by one protocol. The
    model's own input normalisation and decision threshold are always its own.
    """
    model, config, state = model_from_checkpoint(checkpoint)
    protocol = settings or config
    torch_device = select_device(device or config.device)
    report = check_pairs(list_split(data_root, split), split, label_threshold=protocol.label_threshold)
    if not report.valid or (not report.ok and not protocol.skip_invalid):
        raise InvalidDatasetError([report])
    pairs = PairLoader(report.valid, label_threshold=protocol.label_threshold)
    loader = DataLoader(EvalPairDataset(pairs, config.normalize), batch_size=1)
    threshold = decision_threshold(state, config)
    metrics = evaluate_model(model.to(torch_device), loader, torch_device,
                             EvalSettings.from_config(protocol, tta=True, threshold=threshold),
                             precision=Precision.choose(torch_device, config.amp))
    return {"split": split, "checkpoint": str(checkpoint), "epoch": state["epoch"], "pairs": len(report.valid),
            "skipped": [p.name for p in report.problems], "threshold": threshold, **metrics}
