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
from .data.geotiff import ImageSpec
from .data.splits import split_pairs
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
    # The data's layout comes from the protocol (it describes the dataset); the bands and their
    # scaling from the model (they describe what it was trained to see).
    image_spec = ImageSpec.from_config(config)
    plan = split_pairs(data_root, split, protocol)
    report = check_pairs(plan.pairs, plan.split, label_threshold=protocol.label_threshold, image_spec=image_spec)
    if not report.valid or (not report.ok and not protocol.skip_invalid):
        raise InvalidDatasetError([report])
    pairs = PairLoader(report.valid, label_threshold=protocol.label_threshold, image_spec=image_spec)
    loader = DataLoader(EvalPairDataset(pairs, config.normalize), batch_size=1)
    threshold = decision_threshold(state, config)
    metrics = evaluate_model(model.to(torch_device), loader, torch_device,
                             EvalSettings.from_config(protocol, tta=True, threshold=threshold),
                             precision=Precision.choose(torch_device, config.amp))
    return {"split": split, "checkpoint": str(checkpoint), "epoch": state["epoch"], "pairs": len(report.valid),
            "skipped": [p.name for p in report.problems], "threshold": threshold, **metrics}
