"""Finding the image pairs of a split in the layouts change-detection datasets come in.

- split folders (published LEVIR-CD): ``ROOT/{train,val,test}/{A,B,label}/*``
- tiled: ``ROOT/{A,B,label}/*`` with ``ROOT/list/{split}.txt`` naming the files of each split.
  Without a list file for the split, the files whose names start with ``{split}_`` form it (the
  LEVIR-CD tile naming), and the split ``all`` is every file.

The folder names of the two dates and the label differ between datasets (``time1``, ``Image1``,
``t1``, ``OUT``, ``mask``...): a :class:`Layout` names them, and :data:`PRESETS` holds those of
the published datasets (config key ``dataset``); ``folders`` replaces a preset's names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DatasetLayoutError(ValueError):
    """The directory does not hold a dataset layout this reader knows, or lacks a split."""


@dataclass(frozen=True)
class PairPaths:
    name: str
    image_a: Path
    image_b: Path
    label: Path | None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _label_for(label_dir: Path, name: str) -> Path | None:
    exact = label_dir / name
    if exact.exists():
        return exact
    # Labels are sometimes stored as PNG beside JPEG/TIFF images.
    for suffix in IMAGE_SUFFIXES:
        candidate = label_dir / (Path(name).stem + suffix)
        if candidate.exists():
            return candidate
    return None


@dataclass(frozen=True)
class Layout:
    """Where a dataset keeps its pairs. ``structure`` ``auto`` detects split folders or tiled;
    ``splits`` are the splits a published dataset ships (for messages; None = not known)."""

    structure: Literal["auto", "split-folders", "tiled"] = "auto"
    a: str = "A"
    b: str = "B"
    label: str = "label"
    splits: tuple[str, ...] | None = None
    name: str | None = None

    def describe(self) -> str:
        dirs = f"{{{self.a},{self.b},{self.label}}}"
        split_names = "|".join(self.splits) if self.splits else "train|val|test"
        if self.structure == "tiled":
            return f"{dirs}/ with list/{{{split_names}}}.txt"
        if self.structure == "split-folders":
            return f"{{{split_names}}}/{dirs}/"
        return f"{{{split_names}}}/{dirs}/ or tiled {dirs}/ with list/"


DEFAULT_LAYOUT = Layout()

# The published layouts (folder names as each dataset's archive ships them; point the dataset root
# at the folder that holds the splits).
PRESETS: dict[str, Layout] = {
    # 1024x1024 PNG; 445 / 64 / 128 pairs.
    "levir-cd": Layout("split-folders", splits=("train", "val", "test"), name="levir-cd"),
    # 1024x1024 PNG; 637 / 348 pairs: no validation split (see val_fraction).
    "levir-cd+": Layout("split-folders", splits=("train", "test"), name="levir-cd+"),
    # The 256x256 tiles of the WHU building change dataset as the change-detection literature
    # distributes them (WHU-CD-256): one folder per date, split lists.
    "whu-cd": Layout("tiled", splits=("train", "val", "test"), name="whu-cd"),
    # CDD (season-varying, Lebedev et al. 2018): Real/subset/{train,val,test}/{A,B,OUT}, 256x256 JPEG.
    "cdd": Layout("split-folders", label="OUT", splits=("train", "val", "test"), name="cdd"),
    # SYSU-CD: 256x256 PNG.
    "sysu-cd": Layout("split-folders", a="time1", b="time2", splits=("train", "val", "test"), name="sysu-cd"),
    # S2Looking: 1024x1024 PNG; label/ is the change mask (label1/ and label2/, new and demolished
    # buildings, are not read).
    "s2looking": Layout("split-folders", a="Image1", b="Image2", splits=("train", "val", "test"), name="s2looking"),
    # DSIFN: 512x512 JPEG images; masks PNG in train and val, TIFF in test.
    "dsifn": Layout("split-folders", a="t1", b="t2", label="mask", splits=("train", "val", "test"), name="dsifn"),
}


def layout_from_config(config: Any) -> Layout:
    """The layout of a TrainConfig (or anything with ``dataset`` and ``folders``): the preset's,
    with the folder names of ``folders`` over it."""
    dataset, folders = getattr(config, "dataset", None), getattr(config, "folders", None)
    if dataset is None:
        layout = DEFAULT_LAYOUT
    elif dataset in PRESETS:
        layout = PRESETS[dataset]
    else:
        raise DatasetLayoutError(f"unknown dataset preset '{dataset}' (known: {', '.join(PRESETS)})")
    if folders is not None:
        layout = replace(layout, a=folders.a, b=folders.b, label=folders.label)
    return layout


def _pairs_from(folder: Path, names: list[str], layout: Layout) -> list[PairPaths]:
    return [
        PairPaths(name=n, image_a=folder / layout.a / n, image_b=folder / layout.b / n,
                  label=_label_for(folder / layout.label, n))
        for n in names
    ]


def _names(folder: Path, layout: Layout) -> list[str]:
    return sorted({p.name for sub in (layout.a, layout.b) if (folder / sub).is_dir()
                   for p in (folder / sub).iterdir() if _is_image(p)})


def detect_layout(root: Path, layout: Layout = DEFAULT_LAYOUT) -> str:
    """``tiled`` or ``published`` (split folders)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset directory {root} does not exist")
    tiled = (root / layout.a).is_dir() and (root / layout.b).is_dir()
    split_folders = any((p / layout.a).is_dir() for p in root.iterdir() if p.is_dir())
    if tiled and layout.structure in ("tiled", "auto"):
        return "tiled"
    if layout.structure in ("split-folders", "auto") and split_folders:
        return "published"
    what = f"the {layout.name} layout ({layout.describe()})" if layout.name else (
        f"neither the tiled layout ({layout.a}/ {layout.b}/ {layout.label}/ list/) nor the split-folder layout "
        f"(train|val|test/{{{layout.a},{layout.b},{layout.label}}}/)")
    found = sorted(p.name for p in root.iterdir())[:12]
    raise DatasetLayoutError(f"{root} does not hold {what}; found: {', '.join(found) or 'nothing'}")


def list_split(root: Path | str, split: str, layout: Layout = DEFAULT_LAYOUT) -> list[PairPaths]:
    """The pairs of ``split``, sorted by name; a missing image or label is kept (the check reports it)."""
    root = Path(root)
    structure = detect_layout(root, layout)
    if structure == "published":
        folder = root / split
        if not (folder / layout.a).is_dir():
            available = sorted(p.name for p in root.iterdir() if (p / layout.a).is_dir())
            shipped = f"; {layout.name} ships {', '.join(layout.splits)}" if layout.name and layout.splits else ""
            raise DatasetLayoutError(f"split '{split}' not found in {root} (available: {', '.join(available)}"
                                     f"{shipped})")
        return _pairs_from(folder, _names(folder, layout), layout)

    list_file = root / "list" / f"{split}.txt"
    every = _names(root, layout)
    if list_file.exists():
        names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    elif split == "all":
        names = every
    else:
        names = [n for n in every if n.startswith(f"{split}_")]
    if not names:
        lists = sorted(p.stem for p in (root / "list").glob("*.txt")) if (root / "list").is_dir() else []
        raise DatasetLayoutError(
            f"split '{split}' is empty in {root}: no list/{split}.txt and no files named '{split}_*'"
            + (f" (list files: {', '.join(lists)}; or use 'all')" if lists else " (use 'all' for every file)")
        )
    return _pairs_from(root, names, layout)


def has_split(root: Path | str, split: str, layout: Layout = DEFAULT_LAYOUT) -> bool:
    try:
        return bool(list_split(root, split, layout))
    except DatasetLayoutError:
        return False
