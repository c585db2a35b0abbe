"""Fixtures for the ML core tests: the shared real LEVIR-CD tiles and tiny configurations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from schemas.training import TrainConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def levir_samples() -> Path:
    """The real LEVIR-CD tiles beside the repository (``../shared/data/levir-cd-samples``)."""
    path = Path(os.environ.get("CDTRAIN_SAMPLES", REPO.parent / "shared" / "data" / "levir-cd-samples"))
    if not (path / "A").is_dir():
        pytest.fail(f"the LEVIR-CD sample tiles are missing at {path}; set CDTRAIN_SAMPLES to their directory")
    return path


def tiny_config(**overrides) -> TrainConfig:
    """Small enough for a 2-core CPU: width 4-8, small crops, no workers, no compile."""
    values = dict(
        base_channel=4, crop_size=64, batch_size=4, epochs=2, num_workers=0, compile=False, amp=False,
        device="cpu", train_split="demo", val_split="demo", test_split=None, crops_per_image=2,
        window_size=128, window_overlap=16, patience=None,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained_run(levir_samples, tmp_path_factory):
    """A tiny model fitted to seven real tiles in about a minute of CPU: (output dir, TrainResult).

    No augmentation and a constant, higher learning rate: the point is a model that has learned
    something, quickly, for the tests that need one, not the recipe.
    """
    from snunet_cbam.trainer import Trainer

    out = tmp_path_factory.mktemp("trained")
    config = tiny_config(base_channel=8, crop_size=128, crops_per_image=4, epochs=12, lr=0.005, warmup_ratio=0,
                         scheduler="constant", weight_decay=0, rotate_prob=0, color_jitter_prob=0, blur_prob=0,
                         swap_prob=0, window_size=None, window_overlap=0)
    return out, Trainer(config, levir_samples, out).fit()
