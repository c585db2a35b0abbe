"""Torch datasets over checked pairs: random augmented crops for training, whole images for
evaluation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .augment import PairedAugmentation, sample_seeds
from .geotiff import DEFAULT_SPEC, ImageSpec, read_image
from .imageio import DEFAULT_LABEL_THRESHOLD, read_mask
from .layouts import PairPaths

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]


def normalisation(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``normalize: imagenet`` for ``channels`` bands: ImageNet's per-channel statistics for RGB;
    for any other band count (multispectral, a single band) ImageNet's mean and std averaged over
    RGB, for every band: the stretched bands then sit in the range RGB inputs do."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (np.full(channels, IMAGENET_MEAN.mean(), dtype=np.float32),
            np.full(channels, IMAGENET_STD.mean(), dtype=np.float32))


def to_tensor(image: np.ndarray, normalize: str) -> torch.Tensor:
    """HWC uint8 (RGB, or any band count) → CHW float32, ImageNet-normalised or scaled to [0, 1]."""
    if image.ndim == 2:  # a single band (cv2 drops a trailing axis of 1)
        image = image[..., None]
    x = image.astype(np.float32)
    if normalize == "imagenet":
        mean, std = normalisation(x.shape[2])
        x = (x - mean) / std
    else:
        x = x / 255.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class PairLoader:
    """Decodes pairs, optionally keeping them all in memory.

    Training draws many crops from each original (16 per 1024² LEVIR-CD image), so decoding once
    in the parent process, before the DataLoader forks its workers, saves most of the input cost.
    Label pixels >= ``label_threshold`` are change (:func:`imageio.read_mask`); images are read
    with ``image_spec``'s bands and scaling (:mod:`geotiff`).
    """

    def __init__(self, pairs: list[PairPaths], cache: bool = False, threads: int = 4, *,
                 label_threshold: int = DEFAULT_LABEL_THRESHOLD, image_spec: ImageSpec = DEFAULT_SPEC) -> None:
        self.pairs = pairs
        self.label_threshold = label_threshold
        self.image_spec = image_spec
        self._cache: list[Sample] | None = None
        if cache:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                self._cache = list(pool.map(self._decode, pairs))

    def _decode(self, pair: PairPaths) -> Sample:
        assert pair.label is not None
        return (read_image(pair.image_a, self.image_spec), read_image(pair.image_b, self.image_spec),
                read_mask(pair.label, self.label_threshold))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        return self._cache[index] if self._cache is not None else self._decode(self.pairs[index])


def auto_crops_per_image(sizes: list[tuple[int, int]], crop_size: int) -> int:
    """How many crops make one epoch cover the data about once (16 for 1024² at 256)."""
    if not sizes:
        return 1
    mean_area = sum(w * h for w, h in sizes) / len(sizes)
    return max(1, round(mean_area / (crop_size * crop_size)))


class TrainPairDataset(Dataset):
    """Items are addressed by ``(epoch, index)`` so augmentation depends only on the seed, the
    epoch and the index (see :mod:`augment`)."""

    def __init__(self, loader: PairLoader, augmentation: PairedAugmentation, normalize: str,
                 crops_per_image: int, seed: int) -> None:
        self.loader = loader
        self.augmentation = augmentation
        self.normalize = normalize
        self.crops_per_image = crops_per_image
        self.seed = seed

    def __len__(self) -> int:
        return len(self.loader) * self.crops_per_image

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image_a, image_b, mask = self.loader[index // self.crops_per_image]
        a, b, m = self.augmentation(image_a, image_b, mask, sample_seeds(self.seed, epoch, index))
        return {
            "a": to_tensor(a, self.normalize),
            "b": to_tensor(b, self.normalize),
            "label": torch.from_numpy(np.ascontiguousarray(m)).unsqueeze(0).float(),
        }


class EvalPairDataset(Dataset):
    """Whole images, no augmentation; batch size 1 because originals may differ in size."""

    def __init__(self, loader: PairLoader, normalize: str) -> None:
        self.loader = loader
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image_a, image_b, mask = self.loader[index]
        return {
            "a": to_tensor(image_a, self.normalize),
            "b": to_tensor(image_b, self.normalize),
            "label": torch.from_numpy(mask).unsqueeze(0).float(),
            "name": self.loader.pairs[index].name,
        }


class EpochShuffleSampler(Sampler):
    """A permutation drawn from ``(seed, epoch)``, yielding ``(epoch, index)`` keys.

    Carrying the epoch in the key (instead of a dataset attribute) keeps it correct in persistent
    workers, and the order needs no state beyond the epoch number (and, inside an epoch, the
    position reached) to resume exactly.

    Data parallel (``world_size`` > 1): every rank draws the same permutation and takes every
    ``world_size``-th position of it from ``rank`` on, so the shards are disjoint and cover the
    epoch (the last ``length % world_size`` positions are left out, so every rank runs as many
    steps). Step k's batches of all ranks together are then the single-process batch of
    ``batch_size * world_size`` at step k. ``start`` counts positions of this rank's shard.
    """

    def __init__(self, length: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.length = length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    @property
    def shard_length(self) -> int:
        """Samples of one epoch that this rank trains on."""
        return self.length // self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Yield ``epoch``'s permutation from position ``start`` on: a run resumed inside an epoch
        skips the samples it already trained on, without loading or augmenting them."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return max(0, self.shard_length - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator)
        if self.world_size > 1:
            order = order[:self.shard_length * self.world_size][self.rank::self.world_size]
        for index in order[self.start:].tolist():
            yield self.epoch, index


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Training drops the last incomplete batch (BatchNorm dislikes a batch of 1), unless the whole
    set is smaller than one batch."""
    return max(1, num_samples // batch_size) if num_samples >= batch_size else 1


