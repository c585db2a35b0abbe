"""Training configuration from YAML files and ``key=value`` overrides.

A file gives only the keys it changes; the rest are the documented defaults of
:class:`schemas.training.TrainConfig` (mirrored in ``config/train_config.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml

from schemas.training import ConfigError, TrainConfig


def parse_yaml_mapping(text: str, origin: str, *, echo: bool = True) -> dict[str, Any]:
    """``echo`` off: a YAML error names the line and column only, never the text there (the
    file may be anything a job pointed at, and the error is public)."""
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if echo:
            raise ConfigError(f"{origin} is not valid YAML: {exc}") from None
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{origin} is not valid YAML{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{origin} must hold a mapping of keys to values, not {type(values).__name__}")
    return values


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``["epochs=5", "amp=false"]`` → ``{"epochs": 5, "amp": False}`` (values parsed as YAML)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{pair}' must look like key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{pair}': the value is not valid YAML ({exc})") from None
    return values


def load_config(path: Path | str | None = None, overrides: Iterable[str] | dict[str, Any] = (),
                base: TrainConfig | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        values.update(parse_yaml_mapping(path.read_text(), str(path)))
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return TrainConfig.from_mapping(values, base=base)
