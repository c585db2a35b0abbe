"""Finding the image pairs of a split in the two layouts change-detection datasets come in.

- published LEVIR-CD: ``ROOT/{train,val,test}/{A,B,label}/*.png``
- tiled: ``ROOT/{A,B,label}/*`` with ``ROOT/list/{split}.txt`` naming the files of each split.
  Without a list file for the split, the files whose names start with ``{split}_`` form it (the
  LEVIR-CD tile naming), and the split ``all`` is every file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def _pairs_from(folder: Path, names: list[str]) -> list[PairPaths]:
    return [
        PairPaths(name=n, image_a=folder / "A" / n, image_b=folder / "B" / n, label=_label_for(folder / "label", n))
        for n in names
    ]


def detect_layout(root: Path) -> str:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset directory {root} does not exist")
    if (root / "A").is_dir() and (root / "B").is_dir():
        return "tiled"
    if any((root / s / "A").is_dir() for s in ("train", "val", "test")):
        return "published"
    raise DatasetLayoutError(
        f"{root} holds neither the tiled layout (A/ B/ label/ list/) nor the published LEVIR-CD "
        "layout (train|val|test/{A,B,label}/)"
    )


def list_split(root: Path | str, split: str) -> list[PairPaths]:
    """The pairs of ``split``, sorted by name; a missing image or label is kept (the check reports it)."""
    root = Path(root)
    layout = detect_layout(root)
    if layout == "published":
        folder = root / split
        if not (folder / "A").is_dir():
            available = sorted(p.name for p in root.iterdir() if (p / "A").is_dir())
            raise DatasetLayoutError(f"split '{split}' not found in {root} (available: {', '.join(available)})")
        names = sorted({p.name for sub in ("A", "B") for p in (folder / sub).iterdir() if _is_image(p)})
        return _pairs_from(folder, names)

    list_file = root / "list" / f"{split}.txt"
    every = sorted({p.name for sub in ("A", "B") for p in (root / sub).iterdir() if _is_image(p)})
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
    return _pairs_from(root, names)


def has_split(root: Path | str, split: str) -> bool:
    try:
        return bool(list_split(root, split))
    except DatasetLayoutError:
        return False
