"""Log the best checkpoint as an MLflow model that loads anywhere with ``mlflow.pyfunc``.

SNUNet-CBAM's ``forward(a, b)`` takes two images, MLflow's pyfunc one input, so the logged module
is :class:`ChangeDetectionModule`: one float32 tensor ``(N, 6, H, W)`` holding the two dates' RGB
stacked on the channel axis (A then B), raw 0-255 values; the training normalisation is inside
the module. A model trained on C bands (config key ``bands``) takes ``(N, 2C, H, W)``: the
selected bands of each date, already scaled to 0-255 as training scaled them. It returns change
probabilities ``(N, 1, H, W)`` (or logits, ``output="logits"``).

Format: MLflow 3's default PyTorch format, ``pt2`` (``torch.export``). It loads with no pickle and
without this repository's code. The export is dynamic in N, H and W (any H, W >= 16): the module
pads to a multiple of 16 itself (reflect, exactly as the model does) so the graph has no
size-dependent branch, and the export runs with torch's "size-oblivious" sizes so 1s and
multiples of 16 are not baked in. Before anything is uploaded the saved model is loaded back and
checked against the eager module at the example size and at an odd size; ``dynamic_hw`` records
the outcome.

The checkpoint itself goes into the run too, as ``checkpoint/best.pt``: the pyfunc model cannot
be scored with the training's own protocol (sliding windows, blending, TTA, its tuned threshold),
and the registry needs exactly that to score a production model on a new job's data
(``consumer/tracking/promotion.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

from schemas.training import TrainConfig
from snunet_cbam.checkpoint import decision_threshold, eval_weights, load_checkpoint, model_from_checkpoint
from snunet_cbam.data.dataset import normalisation
from snunet_cbam.mlflow_run import CHECKPOINT_ARTIFACT, config_params, log_checkpoint

log = logging.getLogger(__name__)

MODEL_TYPE = "snunet-cbam-change-detection"
DIGEST_TAG = "checkpoint_digest"  # logged-model tag: checkpoint_digest() of the checkpoint it was built from
MIN_SIDE = 16  # the padding is a reflection, which needs the side to exceed the pad (<= 15)
_MULTIPLE = 16  # four 2x poolings
_CHECK_SHAPE = (2, 6, 40, 56)  # odd batch/height/width the export must also handle


class ChangeDetectionModule(nn.Module):
    """One-input wrapper: ``(N, 6, H, W)`` raw RGB A|B (0-255) -> ``(N, 1, H, W)`` change."""

    def __init__(self, model: nn.Module, normalize: str = "imagenet",
                 output: Literal["probability", "logits"] = "probability", channels: int = 3) -> None:
        super().__init__()
        if output not in ("probability", "logits"):
            raise ValueError("output must be 'probability' or 'logits'")
        if normalize == "imagenet":
            mean, std = normalisation(channels)
        elif normalize == "none":
            mean, std = np.zeros(channels, np.float32), np.full(channels, 255.0, np.float32)
        else:
            raise ValueError(f"unknown normalisation {normalize!r}")
        self.model = model
        self.output = output
        self.channels = channels  # per date
        both = 2 * channels
        self.register_buffer("mean", torch.tensor(np.concatenate([mean, mean]), dtype=torch.float32).view(1, both, 1, 1))
        self.register_buffer("std", torch.tensor(np.concatenate([std, std]), dtype=torch.float32).view(1, both, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        x = (x - self.mean) / self.std
        # Pad here, unconditionally, so the exported graph has no branch on the size; the model
        # then sees a multiple of 16 and pads nothing. Same reflection as SNUNetCBAM.forward.
        pad_h = (height + _MULTIPLE - 1) // _MULTIPLE * _MULTIPLE - height
        pad_w = (width + _MULTIPLE - 1) // _MULTIPLE * _MULTIPLE - width
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        logits = self.model(x[:, : self.channels], x[:, self.channels :])[..., :height, :width]
        return torch.sigmoid(logits) if self.output == "probability" else logits


@dataclass(frozen=True)
class LoggedModelInfo:
    model_id: str
    model_uri: str  # models:/<model_id>
    name: str
    run_id: str
    serialization_format: str  # "pt2"
    dynamic_hw: bool  # the saved model was verified at an H, W other than the example's
    output: str  # "probability" or "logits"
    val_f1: float | None  # validation F1 of the checkpoint (its epoch's), None if unknown
    epoch: int | None
    seconds: float
    checkpoint_artifact: str = CHECKPOINT_ARTIFACT  # the checkpoint, as an artifact of ``run_id``


def checkpoint_digest(checkpoint: Path | str | dict[str, Any]) -> str:
    """A digest of what a logged model is built from: the validated weights, the config, the
    epoch and the decision threshold. The trainer rewrites ``best.pt`` (the threshold is added
    at the end of the run), so the file's bytes would not do; equal digests, equal models."""
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location="cpu")
    config = TrainConfig.model_validate(state["config"])
    digest = hashlib.sha256(json.dumps({
        "config": config.model_dump(mode="json"), "epoch": state.get("epoch"),
        "threshold": decision_threshold(state, config),
    }, sort_keys=True).encode())
    for name, tensor in sorted(eval_weights(state).items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_input_example(size: int = 64, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A small deterministic ``(1, 2 * channels, size, size)`` float32 example of raw 0-255 values
    (integers, so its JSON stays short)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(1, 2 * channels, size, size)).astype(np.float32)


@contextlib.contextmanager
def _size_oblivious_export() -> Iterator[bool]:
    """``torch.export`` specialises sizes 0/1 and sizes its guards touch; the "backed size
    oblivious" mode keeps them symbolic. A private torch switch: without it the export still
    works but may only accept the example's size class."""
    try:
        from torch.fx.experimental import _config as fx_config

        patch = fx_config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError, KeyError):
        yield False
        return
    with patch:
        yield True


def _pip_requirements() -> list[str]:
    return [f"torch=={torch.__version__.split('+')[0]}"]


def _check_saved(path: Path, module: ChangeDetectionModule, example: np.ndarray) -> bool:
    """Load the saved model as MLflow will and compare with the eager module; ``True`` when it
    also handled an odd batch/height/width. A mismatch at the example size raises."""
    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model(str(path))
    with torch.no_grad():
        expected = module(torch.from_numpy(example)).numpy()
    got = loaded.predict(example)
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError("the exported model does not reproduce the checkpoint at the example size")
    odd = default_input_example(seed=1, channels=module.channels).repeat(_CHECK_SHAPE[0], axis=0)[..., : _CHECK_SHAPE[2], : _CHECK_SHAPE[3]]
    odd = np.ascontiguousarray(odd)
    try:
        got = loaded.predict(odd)
    except Exception as exc:  # noqa: BLE001 - a guard failure means fixed sizes, not a broken model
        log.warning("the exported model only accepts inputs like the example (%s): %s", example.shape, exc)
        return False
    with torch.no_grad():
        expected = module(torch.from_numpy(odd)).numpy()
    return got.shape == expected.shape and bool(np.allclose(got, expected, atol=1e-4, rtol=1e-4))


def log_best_model(client: MlflowClient, run_id: str, checkpoint_path: Path | str, *, name: str = "model",
                   input_example: np.ndarray | None = None,
                   output: Literal["probability", "logits"] = "probability",
                   tags: dict[str, str] | None = None) -> LoggedModelInfo:
    """Rebuild the model from ``checkpoint_path`` and log it as an MLflow model of ``run_id``.

    Uses only ``client`` (no fluent API, no global tracking URI): the logged model is created in
    the run's experiment, saved locally with ``mlflow.pytorch.save_model`` (pt2, signature,
    input example), verified, uploaded, linked to the run as an output (step = the checkpoint's
    epoch) and marked READY. The checkpoint file is logged first as the run's
    ``checkpoint/best.pt``, so every READY model can be scored again later. Raises on failure (the
    logged model is then marked FAILED).
    """
    import mlflow.pytorch

    started = time.monotonic()
    model, config, state = model_from_checkpoint(checkpoint_path, map_location="cpu")
    channels = config.in_channels
    module = ChangeDetectionModule(model, normalize=config.normalize, output=output, channels=channels).eval()
    example = (default_input_example(channels=channels) if input_example is None
               else np.ascontiguousarray(input_example, np.float32))
    if example.ndim != 4 or example.shape[1] != 2 * channels or min(example.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"input_example must be (N, {2 * channels}, H, W) with H, W >= {MIN_SIDE}, "
                         f"got {example.shape}")
    with torch.no_grad():
        example_out = module(torch.from_numpy(example)).numpy()
    signature = ModelSignature(
        inputs=Schema([TensorSpec(example.dtype, (-1, 2 * channels, -1, -1))]),
        outputs=Schema([TensorSpec(example_out.dtype, (-1, 1, -1, -1))]),
    )
    best = state.get("best") or {}
    epoch = int(state["epoch"]) if "epoch" in state else None
    # The checkpoint is best.pt: its epoch's validation F1 is the best F1.
    val_f1 = float(best["f1"]) if best.get("epoch") == epoch and "f1" in best else None
    metadata = {
        "input": (f"float32 (N, {2 * channels}, H, W): "
                  + (f"bands {config.bands}" if config.bands else "RGB")
                  + " of date A then date B on channels, raw 0-255 values"
                  + (" (as scaled for training)" if config.bands else "")),
        "output": f"float32 (N, 1, H, W): change {output}",
        # The threshold tuned on validation at the end of the run (the config's when none was).
        "min_side": MIN_SIDE, "normalize": config.normalize, "threshold": decision_threshold(state, config),
        "base_channel": config.base_channel, "use_attention": config.use_attention,
        "checkpoint_epoch": epoch, "val_f1": val_f1,
    }
    model_tags = {"output": output, DIGEST_TAG: checkpoint_digest(state),
                  **({"val_f1": repr(val_f1)} if val_f1 is not None else {}), **(tags or {})}

    run = client.get_run(run_id)
    # Before the model: a READY model whose checkpoint is missing could never be judged against a
    # challenger, so a failed upload fails the whole call.
    log_checkpoint(client, run_id, state)
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id,
        params=config_params(config.model_dump()), tags=model_tags, model_type=MODEL_TYPE,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="cdtrain-model-") as tmp:
            path = Path(tmp) / "model"
            mlflow_model = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                 run_id=run_id, model_id=logged.model_id)
            with _size_oblivious_export():
                mlflow.pytorch.save_model(
                    module, str(path), mlflow_model=mlflow_model, serialization_format="pt2",
                    input_example=example, signature=signature, metadata=metadata,
                    pip_requirements=_pip_requirements(),
                )
            _default_device_cpu(path)
            dynamic_hw = _check_saved(path, module, example)
            client.log_model_artifacts(logged.model_id, str(path))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=epoch or 0)])
        client.set_logged_model_tags(logged.model_id, {"dynamic_hw": str(dynamic_hw).lower()})
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return LoggedModelInfo(
        model_id=logged.model_id, model_uri=f"models:/{logged.model_id}", name=name, run_id=run_id,
        serialization_format="pt2", dynamic_hw=dynamic_hw, output=output, val_f1=val_f1, epoch=epoch,
        seconds=time.monotonic() - started,
    )


def _default_device_cpu(path: Path) -> None:
    """A pt2 model keeps the device it was exported on, and MLflow's pyfunc loader picks CUDA
    whenever it is present, then refuses a CPU export. Pin the pyfunc default to CPU so
    ``mlflow.pyfunc.load_model`` works on any host (``model_config`` still overrides it)."""
    mlmodel = Model.load(str(path / "MLmodel"))
    pyfunc_conf: dict[str, Any] | None = mlmodel.flavors.get("python_function")
    if pyfunc_conf is None:
        raise RuntimeError("the saved model has no python_function flavor; it would not load with mlflow.pyfunc")
    pyfunc_conf["model_config"] = {**(pyfunc_conf.get("model_config") or {}), "device": "cpu"}
    mlmodel.save(str(path / "MLmodel"))
