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


# Dataset presets (their folder layouts live in snunet_cbam/data/layouts.py; a test keeps the two
# lists equal, since this module imports nothing of the project).
DATASET_PRESETS = ("levir-cd", "levir-cd+", "whu-cd", "cdd", "sysu-cd", "s2looking", "dsifn")
DatasetPreset = Literal["levir-cd", "levir-cd+", "whu-cd", "cdd", "sysu-cd", "s2looking", "dsifn"]
# One folder name, as for splits: never a path that could leave the dataset root.
FOLDER_NAME_PATTERN = SPLIT_NAME_PATTERN


class DatasetFolders(BaseModel):
    """The folder names of the two dates and the label inside a split (or the dataset root)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a: str = Field("A", pattern=FOLDER_NAME_PATTERN, description="Folder of the first date's images.")
    b: str = Field("B", pattern=FOLDER_NAME_PATTERN, description="Folder of the second date's images.")
    label: str = Field("label", pattern=FOLDER_NAME_PATTERN, description="Folder of the change masks.")


class ImageScale(BaseModel):
    """How images that are not 8-bit become 0-255 values: a linear stretch, per band."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # Lists, not tuples: configs are written back as YAML (safe_dump knows no tuple).
    percentiles: list[float] = Field(
        [2.0, 98.0], min_length=2, max_length=2, description="Per image and band, these percentiles of the pixel values map to 0 and 255 "
                                 "(values beyond are clipped); used for images that are not 8-bit when range is null.")
    range: list[float] | None = Field(
        None, min_length=2, max_length=2, description="A fixed [low, high] mapped to 0 and 255 for every image and band (e.g. [0, 10000] for "
                          "Sentinel-2 reflectance): one mapping for the whole dataset; applies to 8-bit images too.")

    @model_validator(mode="after")
    def _check_order(self) -> "ImageScale":
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError("scale.percentiles must be [low, high] with 0 <= low < high <= 100")
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError("scale.range must be [low, high] with low < high")
        return self


class TrainConfig(BaseModel):
    # No NaN or infinity: no key means anything by them, and stores write them as null.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    # --- schedule and optimiser -------------------------------------------------------------
    epochs: int = Field(100, ge=1, le=10_000,
        description="Passes over the training data (an epoch is crops_per_image crops of every training image).")
    batch_size: int = Field(8, ge=1, le=1024, description="Crops per optimisation step.")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate, reached after the warm-up.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay; never applied to norms and biases.")
    scheduler: Literal["poly", "cosine", "step", "constant"] = Field("poly",
        description="Learning-rate decay after the warm-up, stepped every iteration: poly, cosine, step or constant.")
    warmup_ratio: float = Field(0.025, ge=0, lt=1,
        description="Fraction of all steps spent in the linear warm-up from 0 to lr.")
    poly_power: float = Field(1.0, gt=0, description="Exponent of the poly decay.")
    step_size_epochs: int = Field(30, ge=1, le=10_000, description="Step scheduler: epochs between two decays.")
    step_gamma: float = Field(0.1, gt=0, le=1,
        description="Step scheduler: factor applied to the learning rate at each decay.")
    min_lr: float = Field(0.0, ge=0, description="Floor of the decayed learning rate.")
    crops_per_image: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field("auto",
        description="Random crops drawn per training image each epoch; auto = image area / crop area (16 for a 1024x1024 image at 256, 1 for 256 tiles).")

    # --- model --------------------------------------------------------------------------------
    base_channel: int = Field(32, ge=4, le=256,
        description="Width of the first level of SNUNet-CBAM (paper: 16, 32, 48 give 3.0 M, 12.0 M, 27.1 M parameters).")
    use_attention: bool = Field(True,
        description="ECAM channel attention and CBAM spatial attention; false = plain SNUNet.")
    spatial_attention: bool = Field(True,
        description="CBAM's spatial gate after ECAM (starts neutral); false keeps ECAM only.")
    change_prior: float = Field(0.05, gt=0, lt=1,
        description="Change probability the classifier predicts everywhere at initialisation (about the share of change pixels).")

    # --- loss ---------------------------------------------------------------------------------
    weight_bce: float = Field(1.0, ge=0, description="Weight of binary cross-entropy in the hybrid loss.")
    weight_dice: float = Field(1.0, ge=0, description="Weight of soft Dice in the hybrid loss.")
    pos_weight: float | None = Field(None, gt=0,
        description="BCE weight of the change class for heavy class imbalance; null = 1.")

    # --- data and augmentation ----------------------------------------------------------------
    crop_size: int = Field(256, ge=16, le=4096,
        description="Side of the square training crops (images smaller than this are padded by reflection).")
    crop_max_class_ratio: float = Field(0.75, gt=0, le=1,
        description="A crop is re-drawn (up to 10 times) while one class covers more than this fraction of it; 1.0 = take every crop as drawn.")
    normalize: Literal["imagenet", "none"] = Field("imagenet",
        description="Input normalisation: imagenet (ImageNet mean and std per RGB channel) or none (scale 0-255 to 0-1).")
    rotate_before_crop: bool = Field(True,
        description="Rotate the image, then cut the crop inside it, so no reflected content enters a crop.")
    rotate_limit: float = Field(180.0, ge=0, le=180,
        description="Arbitrary rotation within +-rotate_limit degrees (with probability rotate_prob).")
    rotate_prob: float = Field(0.5, ge=0, le=1,
        description="Probability of an arbitrary rotation of a training crop.")
    rotate90_prob: float = Field(0.5, ge=0, le=1,
        description="Probability of a rotation by a random multiple of 90 degrees.")
    hflip_prob: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    vflip_prob: float = Field(0.5, ge=0, le=1, description="Probability of a vertical flip.")
    color_jitter_prob: float = Field(0.5, ge=0, le=1,
        description="Probability of colour jitter, drawn independently for each date, images only (brightness and contrast only for images without 3 bands).")
    brightness: float = Field(0.2, ge=0, description="Colour jitter: largest relative brightness change.")
    contrast: float = Field(0.2, ge=0, description="Colour jitter: largest relative contrast change.")
    saturation: float = Field(0.2, ge=0,
        description="Colour jitter: largest relative saturation change (3-band images).")
    hue: float = Field(0.05, ge=0, le=0.5,
        description="Colour jitter: largest hue shift, as a fraction of the hue circle (3-band images).")
    blur_prob: float = Field(0.2, ge=0, le=1,
        description="Probability of a Gaussian blur, independently for each date, images only.")
    blur_sigma_max: float = Field(1.5, gt=0, description="Largest sigma of the Gaussian blur, in pixels.")
    swap_prob: float = Field(0.0, ge=0, le=1,
        description="Probability of exchanging the two dates of a training pair.")
    label_threshold: int = Field(128, ge=1, le=255,
        description="Label pixels >= this value are change (0/255 labels: 128; 0/1 masks: 1).")
    # --- data sources -------------------------------------------------------------------------
    dataset: DatasetPreset | None = Field(
        None, description="A published dataset's layout: " + ", ".join(DATASET_PRESETS) + "; null = detect "
                          "the split-folder or the tiled layout with the folders A, B and label.")
    folders: DatasetFolders | None = Field(
        None, description="Folder names of the two dates and the label, e.g. {a: time1, b: time2, label: "
                          "label}; replace the preset's (or A, B, label).")
    val_fraction: float | None = Field(
        0.1, gt=0, lt=1, description="When the dataset has no val_split (LEVIR-CD+ has train and test only), "
                                     "this fraction of the training pairs, chosen by name, is held out for "
                                     "validation; null = refuse such a dataset.")
    bands: list[Annotated[int, Field(ge=1, le=64)]] | None = Field(
        None, min_length=1, max_length=16,
        description="Bands to read from each image, 1-based as in GDAL (e.g. [3, 2, 1] for an RGB composite "
                    "of a BGR image); the model takes this many channels per date. null = RGB (3 bands).")
    scale: ImageScale = Field(
        default_factory=ImageScale,
        description="How images that are not 8-bit (and any image, with range) are stretched to 0-255.")
    # Folder names under the dataset root: never a path that could leave it.
    train_split: str = Field("train", pattern=SPLIT_NAME_PATTERN,
        description="Training split: a folder of the split-folder layouts, or list/NAME.txt (else files named NAME_*) of the tiled layout.")
    val_split: str = Field("val", pattern=SPLIT_NAME_PATTERN,
        description="Validation split, named like train_split; when the dataset has none, val_fraction of the training pairs are held out instead.")
    test_split: str | None = Field("test", pattern=SPLIT_NAME_PATTERN,
        description="Split scored with the best checkpoint after training, when the dataset has it; null = none.")
    skip_invalid: bool = Field(False,
        description="false: stop before training and name every bad pair; true: skip bad pairs with a warning.")
    num_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field("auto",
        description="DataLoader worker processes; auto = usable cores - 1, at most 8.")
    cache_images: bool = Field(True,
        description="Decode every pair once into memory before training (unless over cache_max_gb).")
    cache_max_gb: float = Field(8.0, ge=0, le=1024,
        description="Largest decoded dataset, in GiB, that cache_images keeps in memory.")

    # --- evaluation ---------------------------------------------------------------------------
    window_size: int | None = Field(1024, ge=16, le=16_384,
        description="Images up to this side are scored whole; larger ones by blended sliding windows of this side (also the tile of cdtrain predict); null = always whole.")
    window_overlap: int = Field(512, ge=0, description="Pixels shared by neighbouring windows.")
    window_blend: Literal["gaussian", "linear", "mean"] = Field("gaussian",
        description="Weight of each window's pixels where windows overlap: gaussian, linear (a tent) or mean (equal).")
    threshold: float = Field(0.5, gt=0, lt=1,
        description="Change probability above which a pixel counts as change during validation (a tuned threshold replaces it after training).")
    tune_threshold: bool = Field(True,
        description="After training, choose the threshold with the best validation F1 and store it with the checkpoint and the model.")
    tta: Literal["none", "flip"] = Field("flip",
        description="Test-time augmentation of the final validation, the test, the registry's scoring and prediction: none, or flip (average of four flips).")

    # --- early stopping -----------------------------------------------------------------------
    patience: int | None = Field(20, ge=1, le=10_000,
        description="Epochs without a validation F1 gain above min_delta before stopping early; null = never stop early.")
    min_delta: float = Field(0.0, ge=0,
        description="Smallest validation F1 gain that counts as an improvement for early stopping.")
    min_epochs_fraction: float = Field(0.5, ge=0, le=1,
        description="Early stopping never stops before this fraction of the epochs has run.")
    ema_decay: float | None = Field(None, ge=0, lt=1,
        description="Keep an exponential moving average of the weights with this decay (e.g. 0.999) and validate, checkpoint and export it; null = off.")

    # --- runtime ------------------------------------------------------------------------------
    seed: int = Field(42,
        description="Seeds the model initialisation, the shuffling and every sample's augmentation.")
    device: Literal["auto", "cuda", "mps", "cpu"] | str = Field("auto",
        description="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
    amp: bool = Field(True,
        description="Mixed precision: bf16 on CUDA (fp16 with gradient scaling without bf16) and on CPUs with native bf16; ignored elsewhere.")
    channels_last: Literal["auto"] | bool = Field("auto",
        description="NHWC memory format; auto = on CUDA and on CPUs with native bf16.")
    compile: Literal["auto"] | bool = Field("auto",
        description="torch.compile the model; auto = on CUDA for runs of at least 20,000 steps (a cold "
                    "compile takes minutes and pays only on long runs), never on the CPU.")
    time_limit_minutes: float | None = Field(None, gt=0, le=MAX_TIME_LIMIT_MINUTES,
        description="Stop cleanly (checkpoint kept, resumable) after this many minutes; null = no limit.")
    log_every_steps: int = Field(10, ge=1, le=1_000_000,
        description="Step loss and metrics are read from the device every this many steps.")
    gpus: int = Field(1, ge=1, le=16,
        description="Data parallel: train with this many processes, one per CUDA device (DDP, nccl), or this "
                    "many CPU processes with device: cpu (gloo). batch_size is per process: the global batch "
                    "is batch_size x gpus, and lr applies to that global batch as given (never scaled). "
                    "The worker must have at least this many GPUs, else the job fails at start.")
    panel_tiles: int = Field(4, ge=0, le=32,
        description="Validation tiles shown in each epoch's panel (before, after, truth, prediction with false positives and negatives coloured), spread evenly over the split and the same every epoch; 0 = no panels.")

    @model_validator(mode="after")
    def _check_consistency(self) -> "TrainConfig":
        if self.window_size is not None and self.window_overlap >= self.window_size:
            raise ValueError("window_overlap must be smaller than window_size")
        if self.weight_bce == 0 and self.weight_dice == 0:
            raise ValueError("weight_bce and weight_dice cannot both be 0")
        if self.bands is not None and len(set(self.bands)) != len(self.bands):
            raise ValueError(f"bands must not repeat a band, got {self.bands}")
        if not (self.device in ("auto", "cuda", "mps", "cpu") or self.device.startswith("cuda:")):
            raise ValueError("device must be auto, cpu, mps, cuda or cuda:N")
        if self.gpus > 1 and self.device not in ("auto", "cuda", "cpu"):
            raise ValueError("gpus > 1 needs device auto, cuda or cpu (one process per device; cuda:N pins one)")
        return self

    @property
    def in_channels(self) -> int:
        """Channels of one date's image as the model takes it."""
        return len(self.bands) if self.bands else 3

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
