"""Checkpoints: everything needed to resume exactly, or to rebuild the model for evaluation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from schemas.training import TrainConfig

from .model import SNUNetCBAM

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Written to a temporary file and renamed, so a crash never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Checkpoints hold RNG states and plain Python containers, so the full unpickler is needed;
    # only load checkpoints you wrote.
    state = torch.load(path, map_location=map_location, weights_only=False)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a checkpoint of this trainer (format {state.get('format')})")
    return state


def eval_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The weights that were validated: the moving average when the run kept one (``ema_decay``),
    else the trained weights."""
    return state["ema"]["model"] if "ema" in state else state["model"]


def decision_threshold(state: dict[str, Any], config: TrainConfig) -> float:
    """The threshold tuned on validation at the end of the run, else the configured one."""
    return float(state.get("threshold", config.threshold))


def save_model_checkpoint(state: dict[str, Any], path: Path) -> None:
    """The model alone, for scoring, export and prediction: the validated weights, the config,
    the epoch, its validation scores and the decision threshold; no optimiser, scheduler or RNG
    state (a third of a training checkpoint's size). It loads like any checkpoint."""
    slim = {"model": eval_weights(state), "config": state["config"], "epoch": state["epoch"],
            "best": state.get("best"), **({"threshold": state["threshold"]} if "threshold" in state else {})}
    save_checkpoint(path, slim)


def build_model(config: TrainConfig) -> SNUNetCBAM:
    return SNUNetCBAM(in_channels=config.in_channels, base_channel=config.base_channel, use_attention=config.use_attention,
                      spatial_attention=config.spatial_attention, change_prior=config.change_prior)


def model_from_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> tuple[SNUNetCBAM, TrainConfig, dict]:
    state = load_checkpoint(path, map_location)
    config = TrainConfig.model_validate(state["config"])
    model = build_model(config)
    model.load_state_dict(eval_weights(state))
    return model, config, state
