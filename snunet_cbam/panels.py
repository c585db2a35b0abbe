"""Pictures of a run: validation panels, the precision-recall curve, the confusion matrix.

A *panel* shows a fixed set of validation tiles, one row each: before | after | truth |
prediction, the prediction coloured by outcome (true positive white, false positive magenta,
false negative green, true negative black), so that a reader sees at a glance where the model
invents change and where it misses it. Magenta and green stay apart for the common colour-vision
deficiencies, where red and green would not.

Rendering is numpy and PIL only (the curves use matplotlib, which MLflow brings with it): nothing
here knows of MLflow or torch, so it is tested on crafted arrays.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Outcome colours of the prediction column (RGB).
TP_COLOUR = (255, 255, 255)
FP_COLOUR = (255, 0, 255)
FN_COLOUR = (0, 200, 0)
TN_COLOUR = (0, 0, 0)
CHANGE_COLOUR = (255, 255, 255)  # truth column: change white, no change black

CELL = 256  # side of one picture in a panel, in pixels
GAP = 4
HEADER = 18  # room for a line of text (PIL's default bitmap font)
BACKGROUND = (40, 40, 40)
TEXT = (235, 235, 235)
COLUMNS = ("before", "after", "truth", "prediction")


@dataclass(frozen=True)
class PanelTile:
    """One validation tile as it was scored: the two dates as displayed (H x W x C uint8; the first
    three bands are shown as RGB, one band as grey), the truth and the decision (H x W bool)."""

    name: str
    before: np.ndarray
    after: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray

    def counts(self) -> tuple[int, int, int, int]:
        """``(tp, fp, fn, tn)`` of this tile."""
        truth, pred = self.truth.astype(bool), self.prediction.astype(bool)
        return (int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum()),
                int((~pred & ~truth).sum()))


@dataclass(frozen=True)
class ValidationPanel:
    """The panel tiles of one epoch's validation, with the threshold their decision used."""

    epoch: int
    threshold: float
    tiles: tuple[PanelTile, ...]


def panel_indices(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``total`` images (all of them when there are fewer):
    the same tiles every epoch and in every resumed attempt, from the split's order alone."""
    if count <= 0 or total <= 0:
        return []
    if count >= total:
        return list(range(total))
    return sorted({(i * total) // count for i in range(count)})


def outcome_map(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8: each pixel coloured by its outcome (TP, FP, FN, TN)."""
    truth, pred = truth.astype(bool), prediction.astype(bool)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    out = np.empty((*truth.shape, 3), dtype=np.uint8)
    out[pred & truth] = TP_COLOUR
    out[pred & ~truth] = FP_COLOUR
    out[~pred & truth] = FN_COLOUR
    out[~pred & ~truth] = TN_COLOUR
    return out


def display_rgb(image: np.ndarray) -> np.ndarray:
    """An image of any band count as H x W x 3 uint8 (first three bands; one band as grey)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] >= 3:
        rgb = image[..., :3]
    else:
        rgb = np.repeat(image[..., :1], 3, axis=2)
    return np.ascontiguousarray(rgb.astype(np.uint8))


def _fit(picture: np.ndarray, side: int, nearest: bool) -> Image.Image:
    """``picture`` scaled so that its longer side is ``side`` (masks by nearest neighbour: a pixel
    keeps its outcome colour), centred on a square of the background."""
    image = Image.fromarray(picture)
    scale = side / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)
    cell = Image.new("RGB", (side, side), BACKGROUND)
    cell.paste(image, ((side - size[0]) // 2, (side - size[1]) // 2))
    return cell


def cell_origin(row: int, column: int, cell: int = CELL) -> tuple[int, int]:
    """Top-left pixel of a tile's picture in a panel (row from 0, column as in ``COLUMNS``)."""
    return GAP + column * (cell + GAP), 2 * HEADER + GAP + row * (HEADER + cell + GAP) + HEADER


def render_panel(tiles: Sequence[PanelTile], *, title: str = "", cell: int = CELL) -> Image.Image:
    """One row per tile: before | after | truth | prediction coloured by outcome; a header with
    ``title`` and the colour key, each row named with its tile and F1."""
    if not tiles:
        raise ValueError("a panel needs at least one tile")
    font = ImageFont.load_default()
    width = GAP + len(COLUMNS) * (cell + GAP)
    top = 2 * HEADER + GAP
    row_height = HEADER + cell + GAP
    panel = Image.new("RGB", (width, top + len(tiles) * row_height), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    draw.text((GAP, 2), title, fill=TEXT, font=font)
    # The colour key at the right of the title line, as swatches: the panel reads on its own.
    x = width - 4 * 50
    for label, colour in (("TP", TP_COLOUR), ("FP", FP_COLOUR), ("FN", FN_COLOUR), ("TN", TN_COLOUR)):
        draw.rectangle((x, 3, x + 10, 13), fill=colour, outline=TEXT)
        draw.text((x + 14, 2), label, fill=TEXT, font=font)
        x += 50
    for c, name in enumerate(COLUMNS):
        draw.text((GAP + c * (cell + GAP), HEADER + 2), name, fill=TEXT, font=font)
    for r, tile in enumerate(tiles):
        y = top + r * row_height
        tp, fp, fn, _ = tile.counts()
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
        draw.text((GAP, y + 2), f"{tile.name}   F1 {f1:.3f}   TP {tp}  FP {fp}  FN {fn}", fill=TEXT, font=font)
        truth = np.where(tile.truth.astype(bool)[..., None], np.uint8(255), np.uint8(0)).repeat(3, axis=2)
        pictures = ((display_rgb(tile.before), False), (display_rgb(tile.after), False), (truth, True),
                    (outcome_map(tile.truth, tile.prediction), True))
        for c, (picture, nearest) in enumerate(pictures):
            panel.paste(_fit(picture, cell, nearest), cell_origin(r, c, cell))
    return panel


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# --- curves ---------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in worker threads
    import matplotlib.pyplot as plt

    return plt


def render_pr_curve(document: dict[str, Any], *, title: str = "") -> bytes:
    """PNG of a precision-recall document (:func:`snunet_cbam.thresholds.pr_curve_document`), the
    chosen threshold marked."""
    plt = _pyplot()
    curve, chosen = document["curve"], document["chosen"]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    try:
        ax.plot(curve["recall"], curve["precision"], color="#1f77b4", lw=1.5, label="precision-recall")
        ax.scatter([chosen["recall"]], [chosen["precision"]], color="#d62728", zorder=3,
                   label=f"threshold {chosen['threshold']:.3f}: F1 {chosen['f1']:.3f}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1.01)
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        ax.set_title(title or "precision-recall")
        return _png(fig)
    finally:
        plt.close(fig)


def render_confusion_matrix(document: dict[str, Any], *, title: str = "") -> bytes:
    """PNG of a confusion document (:func:`snunet_cbam.thresholds.confusion_document`): counts and
    the share of each true class."""
    plt = _pyplot()
    counts, normalized = np.array(document["counts"]), np.array(document["normalized"])
    labels = document["labels"]
    fig, ax = plt.subplots(figsize=(5, 4.4), dpi=100)
    try:
        ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                share = normalized[i, j]
                ax.text(j, i, f"{int(counts[i, j]):,}\n{share:.1%}" if math.isfinite(share) else f"{int(counts[i, j]):,}",
                        ha="center", va="center", color="white" if share > 0.5 else "black")
        ax.set_xticks([0, 1], labels)
        ax.set_yticks([0, 1], labels, rotation=90, va="center")
        ax.set_xlabel("prediction")
        ax.set_ylabel("truth")
        ax.set_title(title or f"confusion at threshold {document['threshold']:.3f}")
        return _png(fig)
    finally:
        plt.close(fig)


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
