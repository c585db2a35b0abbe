"""The pairs each role of a run (train, val, test) reads, including a validation split held out
from training when the dataset ships none (LEVIR-CD+ has train and test only).

The held-out pairs are chosen by a hash of their names, not by the seed: the same pairs are held
out by every run, resumed or not, and whatever the listing order, so validation scores of runs
with different seeds compare.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from schemas.training import TrainConfig

from .layouts import DatasetLayoutError, PairPaths, has_split, layout_from_config, list_split

HELD_OUT = "held out of {train}"


@dataclass(frozen=True)
class RolePairs:
    split: str  # the split's name as reported (a held-out validation says so)
    pairs: list[PairPaths]


def _rank(pair: PairPaths) -> str:
    return hashlib.sha256(pair.name.encode()).hexdigest()


def hold_out(pairs: list[PairPaths], fraction: float) -> tuple[list[PairPaths], list[PairPaths]]:
    """(kept for training, held out): ``ceil(fraction * n)`` pairs, at least one, at most n - 1."""
    if len(pairs) < 2:
        raise DatasetLayoutError(f"cannot hold out validation pairs from {len(pairs)} training pair(s)")
    count = min(len(pairs) - 1, max(1, math.ceil(fraction * len(pairs))))
    held = {p.name for p in sorted(pairs, key=_rank)[:count]}
    return [p for p in pairs if p.name not in held], [p for p in pairs if p.name in held]


def needs_held_out_val(root: Path | str, config: TrainConfig) -> bool:
    """True when validation comes out of the training split (the dataset has no ``val_split``)."""
    if config.val_split == config.train_split:
        return False
    return not has_split(root, config.val_split, layout_from_config(config))


def split_pairs(root: Path | str, split: str, config: TrainConfig, *, whole_train: bool = False) -> RolePairs:
    """The pairs of ``split`` under ``config``'s layout; ``val_split`` missing from the dataset
    reads as the held-out part of the training split (``val_fraction``), and ``train_split``
    then loses those pairs (unless ``whole_train``: a check reads every training pair)."""
    layout = layout_from_config(config)
    roles = (config.val_split,) if whole_train else (config.train_split, config.val_split)
    held_out = config.val_fraction is not None and split in roles and needs_held_out_val(root, config)
    if not held_out:
        try:
            return RolePairs(split, list_split(root, split, layout))
        except DatasetLayoutError as exc:
            if split == config.val_split and config.val_fraction is None:
                raise DatasetLayoutError(f"{exc}; set val_fraction (e.g. 0.1) to hold out validation pairs from "
                                         f"'{config.train_split}', or val_split to a split the dataset has") from None
            raise
    train, val = hold_out(list_split(root, config.train_split, layout), config.val_fraction)
    if split == config.train_split:
        return RolePairs(split, train)
    return RolePairs(f"{config.val_split} ({HELD_OUT.format(train=config.train_split)})", val)


def run_splits(root: Path | str, config: TrainConfig) -> dict[str, RolePairs]:
    """role -> pairs for a training run: train and val always, test when the dataset has it."""
    roles = {"train": split_pairs(root, config.train_split, config), "val": split_pairs(root, config.val_split, config)}
    if config.test_split and has_split(root, config.test_split, layout_from_config(config)):
        roles["test"] = split_pairs(root, config.test_split, config)
    return roles
