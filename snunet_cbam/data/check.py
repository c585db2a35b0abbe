"""The dataset check run before training: every bad pair, named, with the reason.

It reads headers and verifies each file's integrity with Pillow (no full decode of the images), so
checking the whole of LEVIR-CD costs seconds, not a training epoch. Labels are decoded (one cheap,
well-compressed channel) to refuse those whose values would all read as "no change" under
``label_threshold`` (a 0/1 mask with the default 128): see :mod:`imageio`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .imageio import DEFAULT_LABEL_THRESHOLD, label_problem, read_label_values
from .layouts import PairPaths

_RGB_MODES = {"RGB"}
_MASK_MODES = {"1", "L", "P", "I", "I;16", "RGB"}


@dataclass(frozen=True)
class PairProblem:
    name: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.name}: " + "; ".join(self.reasons)


@dataclass
class DatasetReport:
    split: str
    valid: list[PairPaths] = field(default_factory=list)
    problems: list[PairProblem] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        lines = [f"split '{self.split}': {len(self.valid)} valid pair(s), {len(self.problems)} invalid"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class InvalidDatasetError(ValueError):
    def __init__(self, reports: list[DatasetReport]) -> None:
        self.reports = reports
        body = "\n".join(r.describe() for r in reports if not r.ok)
        super().__init__(
            f"the dataset has invalid pairs; fix them or set skip_invalid: true to skip them\n{body}"
        )


def _inspect(path: Path, role: str, allowed_modes: set[str], reasons: list[str]) -> tuple[int, int] | None:
    if not path.exists():
        reasons.append(f"missing {role} ({path.name})")
        return None
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            im.verify()
    except Exception as exc:  # Pillow raises many types for corrupt files
        reasons.append(f"unreadable {role} ({type(exc).__name__}: {exc})")
        return None
    if mode not in allowed_modes:
        channels = len(Image.new(mode, (1, 1)).getbands()) if mode else "?"
        expected = "3 (RGB)" if role.startswith("image") else "1"
        reasons.append(f"{role} has {channels} channels (mode {mode}), expected {expected}")
    return size


def _check_label_values(path: Path, threshold: int, reasons: list[str]) -> None:
    try:
        problem = label_problem(read_label_values(path), threshold, path)
    except OSError as exc:
        problem = f"unreadable label ({exc})"
    if problem:
        reasons.append(problem)


def check_pairs(pairs: list[PairPaths], split: str, *,
                label_threshold: int = DEFAULT_LABEL_THRESHOLD) -> DatasetReport:
    report = DatasetReport(split=split)
    for pair in pairs:
        reasons: list[str] = []
        size_a = _inspect(pair.image_a, "image A", _RGB_MODES, reasons)
        size_b = _inspect(pair.image_b, "image B", _RGB_MODES, reasons)
        size_l = None
        if pair.label is None:
            reasons.append("missing label")
        else:
            before = len(reasons)
            size_l = _inspect(pair.label, "label", _MASK_MODES, reasons)
            if len(reasons) == before:  # decode only a label whose header passed
                _check_label_values(pair.label, label_threshold, reasons)
        found = {k: v for k, v in (("A", size_a), ("B", size_b), ("label", size_l)) if v is not None}
        if len(set(found.values())) > 1:
            reasons.append(
                "size mismatch: " + ", ".join(f"{k} {w}x{h}" for k, (w, h) in found.items())
            )
        if reasons:
            report.problems.append(PairProblem(pair.name, tuple(reasons)))
        else:
            report.valid.append(pair)
            report.sizes[pair.name] = size_a  # type: ignore[assignment]
    return report
