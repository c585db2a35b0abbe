"""Synthetic bitemporal change-detection data in the LEVIR-CD "tiled" layout.

Why this exists: the demo, the test suite and the benchmarks need image pairs
with pixel-exact change labels, but LEVIR-CD and its derivatives are large,
third-party and carry their own licences, so we do not ship them.  This module
draws a stand-in from a seed in milliseconds per tile.

The scenes are meant to be learnable but not trivial: a textured rural/suburban
background (Voronoi fields with crop rows, soil, forest; roads), rectangular
buildings with roof colours, pitched halves and outlines.  Some buildings exist
at both dates, some appear (only in B) and some vanish (only in A); the label is
255 exactly on the pixels of appearing or vanishing buildings, as in LEVIR-CD.
Everything else that differs between the dates is a distractor a model must
learn to ignore: crop rotation in some fields, a global seasonal colour shift,
shadows cast with a different sun angle per date, sensor noise and a slight
blur on one date.  About 10 % of the pairs contain no change at all.

Layout written under ``out``::

    A/<name>.png      RGB uint8, date 1
    B/<name>.png      RGB uint8, date 2
    label/<name>.png  uint8 single channel, 0 = no change, 255 = change
    list/{train,val,test}.txt   one file name per line
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["SyntheticDatasetSummary", "make_synthetic_dataset"]

SPLITS: tuple[str, str, str] = ("train", "val", "test")
MIN_SIZE = 32

# Probability that a pair has no change at all (real datasets contain such tiles).
_P_NO_CHANGE = 0.1

# RGB base colours of ground covers: (colour, row-stripe amplitude, grain amplitude).
# Stripes imitate crop rows / ploughing; grain imitates canopy clumps.
_GROUND: tuple[tuple[tuple[float, float, float], float, float], ...] = (
    ((92.0, 128.0, 62.0), 7.0, 4.0),  # green crop
    ((168.0, 152.0, 98.0), 6.0, 3.0),  # dry grass / stubble
    ((142.0, 112.0, 82.0), 4.0, 4.0),  # bare soil
    ((52.0, 78.0, 46.0), 0.0, 11.0),  # forest
    ((186.0, 172.0, 112.0), 8.0, 3.0),  # ripe cereal
    ((118.0, 140.0, 88.0), 3.0, 6.0),  # meadow
)
_ROOFS: tuple[tuple[float, float, float], ...] = (
    (172.0, 72.0, 56.0),  # red tiles
    (178.0, 178.0, 172.0),  # concrete
    (82.0, 112.0, 152.0),  # blue metal
    (222.0, 220.0, 214.0),  # white membrane
    (84.0, 78.0, 78.0),  # dark shingles
    (134.0, 98.0, 72.0),  # brown tiles
)
_ROADS: tuple[tuple[float, float, float], ...] = (
    (118.0, 117.0, 114.0),  # asphalt
    (98.0, 98.0, 98.0),  # dark asphalt
    (166.0, 146.0, 116.0),  # dirt track
)


@dataclass(frozen=True)
class SyntheticDatasetSummary:
    """What :func:`make_synthetic_dataset` wrote."""

    root: Path
    pairs: int
    size: int
    splits: dict[str, int]  # {"train": n, "val": n, "test": n}
    change_fraction: float  # mean fraction of changed pixels over all labels


@dataclass(frozen=True)
class _Building:
    poly: np.ndarray  # (4, 2) int32 footprint corners, x/y
    half: np.ndarray | None  # (4, 2) int32 darker roof half of a pitched roof
    roof: np.ndarray  # (3,) float32 RGB
    height: float  # pixels of shadow per unit of sun "length"
    status: str  # "both", "new" (only in B) or "gone" (only in A)


def make_synthetic_dataset(
    out: Path | str,
    pairs: int,
    size: int = 256,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> SyntheticDatasetSummary:
    """Write ``pairs`` synthetic image pairs of ``size`` x ``size`` pixels under ``out``.

    Output is byte-identical for the same arguments, and pair ``k`` does not
    depend on ``pairs`` (each pair draws from its own spawned generator), so a
    larger dataset extends a smaller one.  The split assignment does depend on
    ``pairs``.  ``split_fractions`` (train, val, test) must be positive; they
    are normalised, and when ``pairs >= 3`` every split gets at least one pair.
    Existing files with the same names are overwritten; other files are left.
    """
    pairs, size, fractions = _validate(pairs, size, split_fractions)
    root = Path(out)
    dirs = {sub: root / sub for sub in ("A", "B", "label", "list")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    width = max(4, len(str(pairs - 1)))
    names = [f"pair_{k:0{width}d}.png" for k in range(pairs)]
    # Children get spawn keys (0,), (1,), ... so pair k is independent of `pairs`;
    # the root itself (empty spawn key) drives the split shuffle.
    root_seq = np.random.SeedSequence(seed)
    # Z_RLE is ~1.5x faster than the default strategy here and compresses these noisy tiles better.
    png = [cv2.IMWRITE_PNG_COMPRESSION, 3, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    changed = 0.0
    for name, child in zip(names, root_seq.spawn(pairs)):
        img_a, img_b, label = _render_pair(np.random.default_rng(child), size)
        _imwrite(dirs["A"] / name, cv2.cvtColor(img_a, cv2.COLOR_RGB2BGR), png)
        _imwrite(dirs["B"] / name, cv2.cvtColor(img_b, cv2.COLOR_RGB2BGR), png)
        _imwrite(dirs["label"] / name, label, png)
        changed += float(np.count_nonzero(label)) / label.size

    counts = _split_counts(pairs, fractions)
    order = np.random.default_rng(root_seq).permutation(pairs)
    start = 0
    for split, n in zip(SPLITS, counts):
        chosen = sorted(names[i] for i in order[start : start + n])
        start += n
        (dirs["list"] / f"{split}.txt").write_text("".join(f"{c}\n" for c in chosen))

    return SyntheticDatasetSummary(
        root=root,
        pairs=pairs,
        size=size,
        splits=dict(zip(SPLITS, counts)),
        change_fraction=changed / pairs,
    )


def _validate(
    pairs: int, size: int, split_fractions: tuple[float, float, float]
) -> tuple[int, int, np.ndarray]:
    if isinstance(pairs, bool) or isinstance(size, bool):
        raise ValueError("pairs and size must be integers, not bool")
    try:
        pairs = operator.index(pairs)
        size = operator.index(size)
    except TypeError as exc:
        raise ValueError(f"pairs and size must be integers: {exc}") from None
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    try:
        fractions = np.asarray(split_fractions, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"split_fractions must be three numbers, got {split_fractions!r}") from None
    if fractions.shape != (3,) or not np.all(np.isfinite(fractions)) or np.any(fractions <= 0):
        raise ValueError(
            f"split_fractions must be three positive finite numbers (train, val, test), "
            f"got {split_fractions!r}"
        )
    return pairs, size, fractions / fractions.sum()


def _split_counts(pairs: int, fractions: np.ndarray) -> list[int]:
    # Largest-remainder rounding keeps the total exact.
    raw = fractions * pairs
    counts = np.floor(raw + 1e-9).astype(int)  # 0.7 * 10 must count as 7, not 6.999...
    for i in np.argsort(-(raw - counts), kind="stable")[: pairs - counts.sum()]:
        counts[i] += 1
    # A training run needs a non-empty val/test split; borrow from the largest split.
    for i in range(3):
        if counts[i] == 0 and counts.max() > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    return [int(c) for c in counts]


def _imwrite(path: Path, image: np.ndarray, params: list[int]) -> None:
    if not cv2.imwrite(str(path), image, params):
        raise OSError(f"could not write {path}")


# --------------------------------------------------------------------------- scene


def _render_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (A, B, label): two RGB uint8 images and the uint8 {0, 255} change mask."""
    ground_a, ground_b, occupied = _background(rng, size)
    buildings = _place_buildings(rng, size, occupied)

    label = np.zeros((size, size), np.uint8)
    for b in buildings:
        if b.status != "both":
            # Same primitives as the roof drawing, so the label covers exactly its pixels.
            cv2.fillPoly(label, [b.poly], 255, cv2.LINE_8)
            cv2.polylines(label, [b.poly], True, 255, 1, cv2.LINE_8)

    # Sun azimuth differs between dates, so shadows move although nothing changed.
    azimuth = rng.uniform(0.0, 2.0 * math.pi)
    sun = (azimuth, azimuth + rng.choice((-1.0, 1.0)) * rng.uniform(0.4, 1.4))
    img_a = _draw_date(rng, ground_a, buildings, "gone", sun[0])
    img_b = _draw_date(rng, ground_b, buildings, "new", sun[1])

    # One date gets the strong seasonal shift, the other only a mild one.
    strong = int(rng.integers(2))
    blurred = int(rng.integers(2)) if rng.random() < 0.8 else -1
    out = []
    for i, img in enumerate((img_a, img_b)):
        img = _seasonal_shift(rng, img, strong=(i == strong))
        if i == blurred:
            img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.1))
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(1.5, 4.5))
        out.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return out[0], out[1], label


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground for both dates (float32 RGB) and a mask of pixels buildings must avoid."""
    area = (size / 256.0) ** 2
    n_fields = max(3, int(round(rng.integers(5, 13) * area)))
    seeds = rng.integers(0, size, size=(n_fields, 2))

    # Voronoi cells as fields: distanceTransformWithLabels gives the nearest seed in O(pixels).
    seed_img = np.ones((size, size), np.uint8)
    seed_img[seeds[:, 1], seeds[:, 0]] = 0
    _, nearest = cv2.distanceTransformWithLabels(
        seed_img, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    lut = np.zeros(int(nearest.max()) + 1, np.int32)
    lut[nearest[seeds[:, 1], seeds[:, 0]]] = np.arange(n_fields)
    field = lut[nearest]

    kind_a = rng.integers(0, len(_GROUND), n_fields)
    # Crop rotation / harvest: some fields change cover between dates, unlabelled as in LEVIR-CD.
    rotate = rng.random(n_fields) < 0.3
    kind_b = np.where(rotate, rng.integers(0, len(_GROUND), n_fields), kind_a)
    base = np.array([g[0] for g in _GROUND], np.float32)
    jitter = rng.normal(0.0, 9.0, (n_fields, 3)).astype(np.float32)
    colour_a = base[kind_a] + jitter
    colour_b = base[kind_b] + jitter

    # Texture is a property of the ground, shared by both dates.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0.0, math.pi, n_fields).astype(np.float32)
    period = rng.uniform(3.5, 10.0, n_fields).astype(np.float32)
    stripe_amp = np.array([g[1] for g in _GROUND], np.float32)[kind_a]
    grain_amp = np.array([g[2] for g in _GROUND], np.float32)[kind_a]
    phase = (xx * np.cos(theta)[field] + yy * np.sin(theta)[field]) / period[field]
    texture = stripe_amp[field] * np.sin(np.float32(2.0 * math.pi) * phase)
    grain = cv2.GaussianBlur(rng.standard_normal((size, size), dtype=np.float32), (0, 0), 0.8)
    texture += grain_amp[field] * grain * np.float32(2.0)
    low = rng.standard_normal((6, 6)).astype(np.float32)
    texture += cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC) * np.float32(7.0)

    ground_a = colour_a[field] + texture[..., None]
    ground_b = colour_b[field] + texture[..., None]

    occupied = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.choice(4, p=(0.25, 0.4, 0.25, 0.1)) * max(1.0, size / 256.0))):
        centre = rng.uniform(0, size, 2)
        angle = rng.uniform(0.0, math.pi)
        reach = 2.0 * size * np.array([math.cos(angle), math.sin(angle)])
        p0 = tuple(int(v) for v in np.rint(centre - reach))
        p1 = tuple(int(v) for v in np.rint(centre + reach))
        thickness = int(rng.integers(3, 9))
        colour = np.array(_ROADS[int(rng.integers(len(_ROADS)))]) + rng.normal(0.0, 5.0)
        for ground in (ground_a, ground_b):
            cv2.line(ground, p0, p1, tuple(float(c) for c in colour), thickness, cv2.LINE_8)
        cv2.line(occupied, p0, p1, 1, thickness + 6, cv2.LINE_8)
    return ground_a, ground_b, occupied


def _place_buildings(rng: np.random.Generator, size: int, occupied: np.ndarray) -> list[_Building]:
    """Rejection-sample non-overlapping rotated rectangles off the roads."""
    no_change = rng.random() < _P_NO_CHANGE
    p_new = rng.uniform(0.05, 0.4)  # construction is more common than demolition
    p_gone = rng.uniform(0.0, 0.2)
    dominant = rng.uniform(0.0, 90.0)  # neighbourhoods tend to share an orientation
    max_side = size / 3.0
    # Density follows the area, with a floor so that small tiles still get buildings.
    attempts = max(4, int(round(rng.integers(6, 40) * (size / 256.0) ** 2)))

    placed: list[tuple[np.ndarray, np.ndarray | None, np.ndarray, float]] = []
    for _ in range(attempts):
        w = min(rng.uniform(10.0, 42.0), max_side)
        h = w * rng.uniform(0.45, 1.0)
        if rng.random() < 0.75:
            angle = dominant + rng.normal(0.0, 3.0)
        else:
            angle = rng.uniform(0.0, 90.0)
        cx, cy = rng.uniform(0.0, size, 2)
        box = cv2.boxPoints(((cx, cy), (w, h), angle))
        poly = np.rint(box).astype(np.int32)

        # Footprint plus a 3 px margin must be free; the check runs on the bounding box only.
        margin = 3
        x0, y0 = np.maximum(poly.min(0) - margin, 0)
        x1, y1 = np.minimum(poly.max(0) + margin + 1, size)
        if x0 >= x1 or y0 >= y1:
            continue
        local = poly - np.array([x0, y0], np.int32)
        patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(patch, [local], 1, cv2.LINE_8)
        cv2.polylines(patch, [local], True, 1, 2 * margin + 1, cv2.LINE_8)
        region = occupied[y0:y1, x0:x1]
        if np.any(region & patch):
            continue
        region |= patch

        half = None
        if rng.random() < 0.5:
            # Pitched roof: split along the long side, one half is in self-shadow.
            long_first = np.linalg.norm(box[1] - box[0]) >= np.linalg.norm(box[2] - box[1])
            b = box if long_first else np.roll(box, -1, axis=0)
            m0, m1 = (b[0] + b[3]) / 2.0, (b[1] + b[2]) / 2.0
            half = np.rint(np.array([b[0], b[1], m1, m0])).astype(np.int32)
        roof = np.array(_ROOFS[int(rng.integers(len(_ROOFS)))], np.float32)
        roof = np.clip(roof + rng.normal(0.0, 10.0, 3).astype(np.float32), 20.0, 245.0)
        placed.append((poly, half, roof, rng.uniform(3.0, 12.0)))

    u = rng.random(len(placed))
    status = np.where(u < p_new, "new", np.where(u < p_new + p_gone, "gone", "both"))
    if no_change:
        status[:] = "both"
    elif placed and np.all(status == "both"):
        # Keep the share of unchanged tiles near _P_NO_CHANGE even when few buildings fit.
        status[int(rng.integers(len(placed)))] = "new" if rng.random() < 0.7 else "gone"
    return [_Building(*args, status=str(st)) for args, st in zip(placed, status)]


def _draw_date(
    rng: np.random.Generator,
    ground: np.ndarray,
    buildings: list[_Building],
    absent: str,
    azimuth: float,
) -> np.ndarray:
    """Draw the buildings present at one date (all but status ``absent``) over ``ground``."""
    img = ground  # ground arrays are private to this pair, so drawing in place is fine
    present = [b for b in buildings if b.status != absent]
    length = rng.uniform(0.5, 1.1)  # sun elevation differs per date
    darkness = np.array(rng.uniform(0.5, 0.7) + np.array([0.0, 0.02, 0.08]), np.float32)
    direction = np.array([math.cos(azimuth), math.sin(azimuth)])

    # Shadows first: the extruded footprint (hull of footprint and its offset copy);
    # roofs drawn afterwards hide the part under the building itself.
    shadow = np.zeros(img.shape[:2], np.uint8)
    for b in present:
        offset = np.rint(direction * b.height * length).astype(np.int32)
        hull = cv2.convexHull(np.vstack([b.poly, b.poly + offset]))
        cv2.fillConvexPoly(shadow, hull, 1, cv2.LINE_8)
    img[shadow.astype(bool)] *= darkness

    for b in present:
        roof = tuple(float(c) for c in b.roof)
        cv2.fillPoly(img, [b.poly], roof, cv2.LINE_8)
        if b.half is not None:
            cv2.fillPoly(img, [b.half], tuple(float(c) * 0.8 for c in b.roof), cv2.LINE_8)
        cv2.polylines(img, [b.poly], True, tuple(float(c) * 0.55 for c in b.roof), 1, cv2.LINE_8)
    return img


def _seasonal_shift(rng: np.random.Generator, img: np.ndarray, strong: bool) -> np.ndarray:
    """Global hue/saturation/brightness change: season, illumination, sensor calibration."""
    if strong:
        dh, ds, dv = rng.uniform(-14.0, 14.0), rng.uniform(0.7, 1.3), rng.uniform(0.8, 1.2)
    else:
        dh, ds, dv = rng.normal(0.0, 3.0), rng.uniform(0.92, 1.08), rng.uniform(0.94, 1.06)
    rgb = np.clip(img, 0.0, 255.0) * np.float32(1.0 / 255.0)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # float input: H in degrees, S and V in [0, 1]
    hsv[..., 0] = (hsv[..., 0] + np.float32(dh)) % np.float32(360.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(ds), 0.0, 1.0)
    hsv[..., 2] = np.clip(hsv[..., 2] * np.float32(dv), 0.0, 1.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * np.float32(255.0)
