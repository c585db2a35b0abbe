"""Change maps of two co-registered scenes of any size: ``cdtrain predict`` and :func:`predict_scene`.

The scenes are read and the maps written window by window (rasterio), a row of tiles at a time:
tiles ``tile`` pixels wide, ``overlap`` pixels apart, weighted towards their centres where they
overlap (the evaluation's Gaussian, linear or equal weights, :mod:`inference`). The rows of a
tile row that no later tile touches are final; they are written and dropped. The blend
accumulator is one tile high and, for scenes wider than ``max_accumulator_mb`` allows (256 MB:
32,768 columns of 1024-pixel tiles), a group of tile columns wide: the scene is then done group
by group, each re-running the tiles of the previous group that reach into its columns (one tile
column per group at half overlap). Memory holds the model, a batch of tiles and that
accumulator, whatever the scene's size.

What is predicted is what evaluation scores: the same reading (bands, scaling), normalisation,
weights, summation order, flips (``tta``), precision and decision (:func:`metrics.change_mask`
at the model's threshold, the one tuned on validation). A scene no larger than one tile goes
through the model whole, as evaluation does with an image no larger than ``window_size``.

Outputs, on the grid (CRS and transform) of the inputs:
- ``*mask.tif``: uint8, 255 = change, 0 = no change (the labels' convention);
- ``*probability.tif``: float32 change probability in [0, 1] (exact; the threshold applies to it);
- ``*overlay.png``: the after image with changed pixels tinted red, for people; scenes larger
  than ``overlay_max_side`` are decimated to that side.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from schemas.training import TrainConfig

from .checkpoint import decision_threshold, model_from_checkpoint
from .data.dataset import to_tensor
from .data.geotiff import ImageSpec, apply_stretch, scene_limits
from .inference import Blend, TTA, forward_tta, window_starts, window_weight
from .metrics import change_mask
from .model_source import resolve_checkpoint
from .runtime import Precision, select_device

log = logging.getLogger(__name__)

DEFAULT_TILE = 1024  # when the model's config scores every image whole (window_size: null)
OVERLAY_MAX_SIDE = 2048
TINT = np.array([255, 0, 0], dtype=np.float32)  # red, half blended into changed pixels
MASK_CHANGE = 255


class ScenePairError(ValueError):
    """Two scenes that cannot be compared pixel for pixel (size, CRS, grid, bands)."""


class PredictionSettingsError(ValueError):
    """A threshold, tile or overlap that cannot be used."""


@dataclass
class Predictor:
    """A model ready to predict: weights on the device, its config and decision threshold."""

    model: nn.Module
    config: TrainConfig
    threshold: float
    device: torch.device
    precision: Precision
    source: str

    @classmethod
    def load(cls, *, model: str | None = None, checkpoint: Path | str | None = None, device: str | None = None,
             tracking_uri: str | None = None) -> "Predictor":
        """From a checkpoint path or a ``models:/`` / ``runs:/`` URI (see :mod:`model_source`); a
        downloaded checkpoint is deleted once loaded."""
        with tempfile.TemporaryDirectory(prefix="cdtrain-model-") as tmp:
            path = resolve_checkpoint(model=model, checkpoint=checkpoint, tracking_uri=tracking_uri, dst_dir=tmp)
            net, config, state = model_from_checkpoint(path)
        torch_device = select_device(device or config.device)
        return cls(model=net.to(torch_device).eval(), config=config, threshold=decision_threshold(state, config),
                   device=torch_device, precision=Precision.choose(torch_device, config.amp),
                   source=str(model if model is not None else path))


@dataclass(frozen=True)
class PredictionResult:
    mask: Path
    probability: Path
    overlay: Path
    threshold: float
    width: int
    height: int
    tiles: int
    changed_pixels: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"mask": str(self.mask), "probability": str(self.probability), "overlay": str(self.overlay),
                "threshold": self.threshold, "width": self.width, "height": self.height, "tiles": self.tiles,
                "changed_pixels": self.changed_pixels,
                "changed_fraction": self.changed_pixels / max(1, self.width * self.height), "model": self.source}


def output_paths(out: Path | str) -> tuple[Path, Path, Path]:
    """``out`` an existing directory or ending with a separator: ``out/change_{mask,probability}.tif``
    and ``out/change_overlay.png``; otherwise a prefix: ``{out}_mask.tif`` and so on."""
    text = str(out)
    if text.endswith(("/", "\\")) or Path(text).is_dir():
        folder = Path(text)
        folder.mkdir(parents=True, exist_ok=True)
        base = folder / "change"
    else:
        base = Path(text)
        base.parent.mkdir(parents=True, exist_ok=True)
    return (base.with_name(base.name + "_mask.tif"), base.with_name(base.name + "_probability.tif"),
            base.with_name(base.name + "_overlay.png"))


def _check_pair(src_a: Any, src_b: Any, before: Path, after: Path, spec: ImageSpec) -> list[int]:
    if (src_a.width, src_a.height) != (src_b.width, src_b.height):
        raise ScenePairError(f"size mismatch: before {before} is {src_a.width}x{src_a.height}, after {after} is "
                             f"{src_b.width}x{src_b.height}; the two dates must cover the same pixel grid")
    if src_a.crs != src_b.crs:
        raise ScenePairError(f"CRS mismatch: before {before} is in {src_a.crs or 'no CRS'}, after {after} in "
                             f"{src_b.crs or 'no CRS'}; reproject one onto the other's grid first "
                             "(e.g. gdalwarp -t_srs ... -tr ... -te ...)")
    if not src_a.transform.almost_equals(src_b.transform):
        raise ScenePairError(f"grid mismatch: before {before} and after {after} have different geotransforms "
                             f"({tuple(src_a.transform)[:6]} vs {tuple(src_b.transform)[:6]}); resample one onto "
                             "the other's grid first")
    try:
        indexes = spec.indexes(src_a.count, before)
        spec.indexes(src_b.count, after)
    except ValueError as exc:
        raise ScenePairError(f"{exc} (the model reads {spec.channels} band(s) per date)") from None
    return indexes


def _profile(src: Any, dtype: str) -> dict[str, Any]:
    profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1, "dtype": dtype,
               "crs": src.crs, "transform": src.transform, "compress": "deflate",
               "predictor": 3 if dtype == "float32" else 2, "BIGTIFF": "IF_SAFER"}
    if src.width >= 256 and src.height >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    return profile


class _Overlay:
    """The after image, decimated to at most ``max_side`` (every ``step``-th row and column), with
    changed pixels tinted; filled from each final block as it is written, one sampled row at a time."""

    def __init__(self, width: int, height: int, max_side: int) -> None:
        self.step = max(1, math.ceil(max(width, height) / max_side))
        self.image = np.zeros((-(-height // self.step), -(-width // self.step), 3), dtype=np.uint8)

    def add(self, src_b: Any, indexes: list[int], limits: np.ndarray | None, top: int, left: int,
            mask: np.ndarray) -> None:
        from rasterio.windows import Window

        step = self.step
        first_row, first_col = -(-top // step) * step, -(-left // step) * step  # sampled, inside the block
        right = left + mask.shape[1]
        if first_col >= right:
            return
        for row in range(first_row, top + mask.shape[0], step):
            window = Window(first_col, row, right - first_col, 1)
            pixels = apply_stretch(src_b.read(indexes, window=window), limits)[0, ::step].astype(np.float32)
            rgb = pixels if pixels.shape[1] == 3 else np.repeat(pixels[:, :1], 3, axis=1)
            changed = mask[row - top, first_col - left :: step] > 0
            rgb[changed] = 0.5 * rgb[changed] + 0.5 * TINT
            self.image[row // step, first_col // step : first_col // step + len(rgb)] = np.clip(np.rint(rgb), 0, 255)

    def write(self, path: Path) -> None:
        import cv2

        if not cv2.imwrite(str(path), cv2.cvtColor(self.image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {path}")


def column_groups(xs: list[int], tile: int, max_columns: int) -> list[tuple[int, int, int]]:
    """Tile columns in groups whose accumulator is at most ``max_columns`` wide (or less than two
    tiles, when that is smaller): ``(first tile, end tile, first own tile)`` per group, tiles as
    indexes into ``xs``. A group owns (and writes) the pixel columns from ``xs[own]`` to the next
    group's; it also runs the tiles of the previous group that reach into those columns, so every
    pixel gets all its tiles, summed in the order evaluation sums them."""
    groups: list[tuple[int, int, int]] = []
    own = 0
    while own < len(xs):
        first = own
        while first > 0 and xs[first - 1] + tile > xs[own]:
            first -= 1
        end = own + 1
        while end < len(xs) and xs[end] + tile - xs[first] <= max_columns:
            end += 1
        groups.append((first, end, own))
        own = end
    return groups


@torch.no_grad()
def predict_scene(before: Path | str, after: Path | str, out: Path | str, *, predictor: Predictor | None = None,
                  model: str | None = None, checkpoint: Path | str | None = None, threshold: float | None = None,
                  tile: int | None = None, overlap: int | None = None, blend: Blend | None = None,
                  tta: TTA | None = None, device: str | None = None, tracking_uri: str | None = None,
                  tiles_per_batch: int = 8, overlay_max_side: int = OVERLAY_MAX_SIDE,
                  max_accumulator_mb: float = 256) -> PredictionResult:
    """Write the change mask, probability and overlay of ``before`` → ``after`` (see the module
    docstring). The model: ``predictor``, or one of ``model`` (URI) and ``checkpoint`` (path).
    ``threshold``, ``tile``, ``overlap``, ``blend``, ``tta`` default to the model's own: its tuned
    threshold, ``window_size`` (else 1024), ``window_overlap`` (else half a tile), ``window_blend``,
    ``tta``. ``max_accumulator_mb`` bounds the blend accumulator: a scene wider than that allows
    is done in groups of tile columns, each also re-running the one or two tiles before it that
    reach into its columns."""
    import rasterio
    from rasterio.windows import Window

    predictor = predictor or Predictor.load(model=model, checkpoint=checkpoint, device=device,
                                            tracking_uri=tracking_uri)
    config = predictor.config
    threshold = predictor.threshold if threshold is None else float(threshold)
    if not 0 < threshold < 1:
        raise PredictionSettingsError(f"threshold must lie in (0, 1), got {threshold}")
    if tile is None:
        tile = config.window_size or DEFAULT_TILE
    if overlap is None:
        overlap = config.window_overlap if tile == config.window_size else tile // 2
    if tile < 16 or not 0 <= overlap < tile:
        raise PredictionSettingsError(f"need tile >= 16 and 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    blend = blend or config.window_blend
    tta = tta or config.tta
    before, after = Path(before), Path(after)
    for role, path in (("before", before), ("after", after)):
        if not path.is_file():
            raise FileNotFoundError(f"{role} image {path} does not exist")
    mask_path, prob_path, overlay_path = output_paths(out)
    spec = ImageSpec.from_config(config)
    model, dev = predictor.model, predictor.device

    with _without_georeferencing_warnings(), rasterio.open(before) as src_a, rasterio.open(after) as src_b:
        if src_a.crs is None:
            log.info("%s carries no georeferencing (no CRS): the outputs will carry none either", before)
        indexes = _check_pair(src_a, src_b, before, after, spec)
        limits_a, limits_b = scene_limits(src_a, indexes, spec), scene_limits(src_b, indexes, spec)
        height, width = src_a.height, src_a.width
        stride = tile - overlap
        ys, xs = window_starts(height, tile, stride), window_starts(width, tile, stride)
        win_h, win_w = min(tile, height), min(tile, width)
        whole = len(ys) == 1 and len(xs) == 1  # predicted whole, unweighted, as evaluation does
        weight_tile = window_weight(tile, blend, dev)[0, 0, :win_h, :win_w]
        # Two float32 accumulators (logits, weights): 8 bytes per pixel of the group's width.
        max_columns = max(win_w, int(max_accumulator_mb * 2**20 // (8 * win_h)))
        overlay = _Overlay(width, height, overlay_max_side)
        changed = 0

        def read(src: Any, limits: np.ndarray | None, y: int, x: int) -> torch.Tensor:
            window = Window(x, y, win_w, win_h)
            return to_tensor(apply_stretch(src.read(indexes, window=window), limits), config.normalize)

        with rasterio.open(mask_path, "w", **_profile(src_a, "uint8")) as dst_mask, \
                rasterio.open(prob_path, "w", **_profile(src_a, "float32")) as dst_prob:
            groups = column_groups(xs, win_w, max_columns)
            for g, (first, end, own) in enumerate(groups):
                origin = xs[first]  # the accumulator's column 0
                span = xs[end - 1] + win_w - origin
                left = xs[own]
                right = xs[groups[g + 1][2]] if g + 1 < len(groups) else width  # own columns: [left, right)
                logits = torch.zeros((win_h, span), dtype=torch.float32, device=dev)
                weight = torch.zeros((win_h, span), dtype=torch.float32, device=dev)
                for i, top in enumerate(ys):
                    for start in range(first, end, tiles_per_batch):
                        chunk = xs[start : min(end, start + tiles_per_batch)]
                        a = torch.stack([read(src_a, limits_a, top, x) for x in chunk]).to(dev)
                        b = torch.stack([read(src_b, limits_b, top, x) for x in chunk]).to(dev)
                        with predictor.precision.autocast(dev):
                            out = forward_tta(model, a, b, tta)
                        for k, x in enumerate(chunk):
                            if whole:
                                logits[:, x - origin : x - origin + win_w] = out[k, 0]
                            else:
                                logits[:, x - origin : x - origin + win_w] += out[k, 0] * weight_tile
                                weight[:, x - origin : x - origin + win_w] += weight_tile
                    # Rows above the next tile row's top receive nothing more: final.
                    done = (ys[i + 1] if i + 1 < len(ys) else top + win_h) - top
                    cols = slice(left - origin, right - origin)
                    final = logits[:done, cols] if whole else logits[:done, cols] / weight[:done, cols]
                    mask = (change_mask(final, threshold).to(torch.uint8) * MASK_CHANGE).cpu().numpy()
                    probability = torch.sigmoid(final).cpu().numpy().astype(np.float32)
                    block = Window(left, top, right - left, done)
                    dst_mask.write(mask, 1, window=block)
                    dst_prob.write(probability, 1, window=block)
                    overlay.add(src_b, indexes, limits_b, top, left, mask)
                    changed += int(np.count_nonzero(mask))
                    # Move the rows still pending (the overlap with the next tile row) to the top.
                    logits = torch.cat([logits[done:], torch.zeros((done, span), device=dev)])
                    weight = torch.cat([weight[done:], torch.zeros((done, span), device=dev)])
            tags = {"threshold": repr(threshold), "model": predictor.source, "tile": str(tile),
                    "overlap": str(overlap), "blend": blend, "tta": tta}
            dst_mask.update_tags(**tags, values="255 = change, 0 = no change")
            dst_prob.update_tags(**tags, values="change probability")
        overlay.write(overlay_path)

    return PredictionResult(mask=mask_path, probability=prob_path, overlay=overlay_path, threshold=threshold,
                            width=width, height=height, tiles=len(ys) * len(xs), changed_pixels=changed,
                            source=predictor.source)


@contextlib.contextmanager
def _without_georeferencing_warnings() -> Iterator[None]:
    """rasterio warns twice per plain PNG/JPEG (read, then write): one log line says it instead."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield
