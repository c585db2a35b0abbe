"""The training configuration: one validated model shared by the CLI, the worker and the ingress.

The defaults here are the documented recipe (mirrored, with comments, in
``config/train_config.yaml``; a test keeps the two equal). They follow open-cd's SNUNet recipe
(ImageNet normalisation, AdamW lr 1e-3 / weight decay 0.05, linear warm-up then poly decay,
256 crops, +-180 degree rotation, flips, photometric distortion), which is the one with the
better published LEVIR-CD score.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


# A split is one folder name: letters, digits, '.', '_' and '-', not starting with '.'.
SPLIT_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"
# Upper bounds keep one request from holding a GPU for a year or a worker's memory hostage; they
# sit far above any real recipe (the job deadline, 90 days at most, bounds time as well).
MAX_TIME_LIMIT_MINUTES = 90 * 24 * 60


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message names the offending key."""


class TrainConfig(BaseModel):
    # No NaN or infinity: no key means anything by them, and stores write them as null.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    # --- schedule and optimiser -------------------------------------------------------------
    epochs: int = Field(100, ge=1, le=10_000)
    batch_size: int = Field(8, ge=1, le=1024)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    scheduler: Literal["poly", "cosine", "step", "constant"] = "poly"
    warmup_ratio: float = Field(0.025, ge=0, lt=1)
    poly_power: float = Field(1.0, gt=0)
    step_size_epochs: int = Field(30, ge=1, le=10_000)
    step_gamma: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)
    crops_per_image: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = "auto"

    # --- model --------------------------------------------------------------------------------
    base_channel: int = Field(32, ge=4, le=256)
    use_attention: bool = True
    spatial_attention: bool = True
    change_prior: float = Field(0.05, gt=0, lt=1)

    # --- loss ---------------------------------------------------------------------------------
    weight_bce: float = Field(1.0, ge=0)
    weight_dice: float = Field(1.0, ge=0)
    pos_weight: float | None = Field(None, gt=0)

    # --- data and augmentation ----------------------------------------------------------------
    crop_size: int = Field(256, ge=16, le=4096)
    crop_max_class_ratio: float = Field(0.75, gt=0, le=1)
    normalize: Literal["imagenet", "none"] = "imagenet"
    rotate_before_crop: bool = True
    rotate_limit: float = Field(180.0, ge=0, le=180)
    rotate_prob: float = Field(0.5, ge=0, le=1)
    rotate90_prob: float = Field(0.5, ge=0, le=1)
    hflip_prob: float = Field(0.5, ge=0, le=1)
    vflip_prob: float = Field(0.5, ge=0, le=1)
    color_jitter_prob: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.05, ge=0, le=0.5)
    blur_prob: float = Field(0.2, ge=0, le=1)
    blur_sigma_max: float = Field(1.5, gt=0)
    swap_prob: float = Field(0.0, ge=0, le=1)
    label_threshold: int = Field(128, ge=1, le=255)
    # Folder names under the dataset root: never a path that could leave it.
    train_split: str = Field("train", pattern=SPLIT_NAME_PATTERN)
    val_split: str = Field("val", pattern=SPLIT_NAME_PATTERN)
    test_split: str | None = Field("test", pattern=SPLIT_NAME_PATTERN)
    skip_invalid: bool = False
    num_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = "auto"
    cache_images: bool = True
    cache_max_gb: float = Field(8.0, ge=0, le=1024)

    # --- evaluation ---------------------------------------------------------------------------
    window_size: int | None = Field(1024, ge=16, le=16_384)
    window_overlap: int = Field(512, ge=0)
    window_blend: Literal["gaussian", "linear", "mean"] = "gaussian"
    threshold: float = Field(0.5, gt=0, lt=1)
    tune_threshold: bool = True
    tta: Literal["none", "flip"] = "flip"

    # --- early stopping -----------------------------------------------------------------------
    patience: int | None = Field(20, ge=1, le=10_000)
    min_delta: float = Field(0.0, ge=0)
    min_epochs_fraction: float = Field(0.5, ge=0, le=1)
    ema_decay: float | None = Field(None, ge=0, lt=1)

    # --- runtime ------------------------------------------------------------------------------
    seed: int = 42
    device: Literal["auto", "cuda", "mps", "cpu"] | str = "auto"
    amp: bool = True
    channels_last: Literal["auto"] | bool = "auto"
    compile: Literal["auto"] | bool = "auto"
    time_limit_minutes: float | None = Field(None, gt=0, le=MAX_TIME_LIMIT_MINUTES)
    log_every_steps: int = Field(10, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _check_consistency(self) -> "TrainConfig":
        if self.window_size is not None and self.window_overlap >= self.window_size:
            raise ValueError("window_overlap must be smaller than window_size")
        if self.weight_bce == 0 and self.weight_dice == 0:
            raise ValueError("weight_bce and weight_dice cannot both be 0")
        if not (self.device in ("auto", "cuda", "mps", "cpu") or self.device.startswith("cuda:")):
            raise ValueError("device must be auto, cpu, mps, cuda or cuda:N")
        return self

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None = None, base: "TrainConfig | None" = None, *,
                     echo_values: bool = True) -> "TrainConfig":
        """Validate ``values`` (only the keys that change) over ``base`` (or the defaults).

        Raises :class:`ConfigError` whose message names every bad key; with ``echo_values`` off
        (a file a job pointed at, whose error becomes public) it names keys and problems only.
        """
        values = dict(values or {})
        merged = {**(base.model_dump() if base else {}), **values}
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, "train config", echo_values=echo_values)) from None


def describe_validation_error(exc: ValidationError, what: str, *, echo_values: bool = True) -> str:
    """One line per bad key, e.g. ``unknown key 'epochz'``. The alternatives of a union
    (``int | 'auto'``) are one key, not several: their messages are joined with "or"."""
    problems: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    unknown: list[str] = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if not is_union_branch(p)) or "(root)"
        if err["type"] == "extra_forbidden":
            unknown.append(f"unknown key '{key}'")
            continue
        problems.setdefault(key, []).append(err["msg"])
        inputs[key] = err.get("input")
    lines = unknown + [f"invalid value for '{key}': {' or '.join(dict.fromkeys(msgs))}"
                       + (f" (got {inputs[key]!r})" if echo_values else "")
                       for key, msgs in problems.items()]
    return f"invalid {what}: " + "; ".join(lines)


def is_union_branch(part: Any) -> bool:
    """pydantic names a union's alternatives in the error location (``constrained-int``,
    ``literal['auto']``, ``int``); they are not keys."""
    return isinstance(part, str) and (not part.isidentifier() or part in {"int", "float", "str", "bool", "none"})
