"""Change-detection checkpoints whose predictions are known exactly, and a dataset drawn for them.

Training a model that beats a quality gate takes minutes on a CPU; the registry tests need
"better" and "worse" in seconds and without luck. So the weights are set by hand:

* :func:`difference_checkpoint`: an SNUNet-CBAM (no attention) reduced to ``|R_B - R_A| > t``:
  the first encoder conv passes date A's and B's red channel (shifted positive), the first
  decoder node takes their difference both ways through its ReLU, and the classifier adds the
  two and subtracts ``t``. Every other weight is zero, and BatchNorm weights of zero turn each
  block into ``relu(conv1(x))``.
* :func:`constant_checkpoint`: all weights zero, the classifier's bias says "change" (or
  "no change") everywhere: the useless model whose F1 is the split's all-change F1 (or 0).

:func:`draw_difference_dataset` draws pairs where date B equals date A except in changed squares,
whose red channel is raised by 150 (strong) or 40 (faint). A difference threshold of 20 finds
both (F1 1.0), of 75 only the strong half (F1 2/3), of 200 neither (F1 0); 1/8 of the pixels
change, so the all-change F1 is 2/9.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from schemas.training import TrainConfig
from snunet_cbam.checkpoint import build_model, save_checkpoint
from snunet_cbam.data.dataset import IMAGENET_STD

SIZE = 32  # small: each scoring is a few full-image forwards on a shared CPU
SQUARE = SIZE // 4
SPLIT = "val"
STRONG, FAINT = 150, 40
# The data above: F1 of each difference threshold, and of calling everything change.
F1_OF_THRESHOLD = {20: 1.0, 75: 2 / 3, 200: 0.0}
ALL_CHANGE_F1 = 2 * 0.125 / (1 + 0.125)


def crafted_config(**overrides) -> TrainConfig:
    """The config stored in the crafted checkpoints, and the evaluation protocol of the tests."""
    values = dict(base_channel=4, use_attention=False, device="cpu", amp=False, compile=False, num_workers=0,
                  window_size=SIZE, window_overlap=0, train_split=SPLIT, val_split=SPLIT, test_split=None,
                  tune_threshold=False)
    values.update(overrides)
    return TrainConfig(**values)


def draw_difference_dataset(root: Path, pairs: int = 4, seed: int = 0) -> Path:
    """``pairs`` 32x32 pairs in the tiled layout (A/, B/, label/, list/val.txt)."""
    rng = np.random.default_rng(seed)
    for folder in ("A", "B", "label", "list"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(pairs):
        a = rng.integers(0, 100, (SIZE, SIZE, 3)).astype(np.uint8)
        b, label = a.copy(), np.zeros((SIZE, SIZE), np.uint8)
        for (y, x), step in (((2, 2), STRONG), ((SIZE // 2 + 2, SIZE // 2 + 2), FAINT)):
            b[y : y + SQUARE, x : x + SQUARE, 0] += step
            label[y : y + SQUARE, x : x + SQUARE] = 255
        name = f"pair_{i:02d}.png"
        names.append(name)
        cv2.imwrite(str(root / "A" / name), a[..., ::-1])  # cv2 writes BGR
        cv2.imwrite(str(root / "B" / name), b[..., ::-1])
        cv2.imwrite(str(root / "label" / name), label)
    (root / "list" / f"{SPLIT}.txt").write_text("\n".join(names) + "\n")
    return root


def _zero_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    weights = {k: torch.zeros_like(v) for k, v in build_model(config).state_dict().items()}
    for key in weights:
        if key.endswith("running_var"):
            weights[key] = torch.ones_like(weights[key])
    return weights


def _save(path: Path, weights: dict[str, torch.Tensor], config: TrainConfig, val_f1: float) -> Path:
    save_checkpoint(path, {"model": weights, "config": config.model_dump(), "epoch": 1,
                           "best": {"epoch": 1, "f1": val_f1}, "threshold": 0.5})
    return path


def difference_checkpoint(path: Path, threshold: float, config: TrainConfig | None = None,
                          val_f1: float = 0.5) -> Path:
    """A model predicting change where ``|R_B - R_A| > threshold`` (0-255 units)."""
    config = config or crafted_config()
    weights = _zero_weights(config)
    weights["conv0_0.conv1.weight"][0, 0, 1, 1] = 1.0  # red channel, normalised, of each date
    weights["conv0_0.conv1.bias"][0] = 3.0  # above zero, so the ReLU keeps it whole
    f0 = config.base_channel  # conv0_1 sees [x0_A (f0), x0_B (f0), up(x1_B)]
    weights["conv0_1.conv1.weight"][0, f0, 1, 1], weights["conv0_1.conv1.weight"][0, 0, 1, 1] = 1.0, -1.0
    weights["conv0_1.conv1.weight"][1, f0, 1, 1], weights["conv0_1.conv1.weight"][1, 0, 1, 1] = -1.0, 1.0
    gain, t = 20.0, threshold / float(IMAGENET_STD[0])
    weights["conv_final.weight"][0, 0], weights["conv_final.weight"][0, 1] = gain, gain
    weights["conv_final.bias"][0] = -gain * t
    return _save(path, weights, config, val_f1)


def constant_checkpoint(path: Path, change: bool, config: TrainConfig | None = None, val_f1: float = 0.5) -> Path:
    """A model predicting change everywhere (``change``) or nowhere."""
    config = config or crafted_config()
    weights = _zero_weights(config)
    weights["conv_final.bias"][0] = 10.0 if change else -10.0
    return _save(path, weights, config, val_f1)
