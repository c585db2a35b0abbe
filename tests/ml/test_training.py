"""Training for real on CPU: the shared LEVIR-CD tiles, exact resume, cancellation, hooks."""

import json
import threading

import pytest
import torch

from snunet_cbam.data.imageio import read_mask
from snunet_cbam.data.layouts import list_split
from snunet_cbam.checkpoint_eval import evaluate_checkpoint
from snunet_cbam.hooks import TrainerHooks
from snunet_cbam.trainer import Trainer

from .conftest import tiny_config

pytestmark = pytest.mark.slow


class Recorder(TrainerHooks):
    def __init__(self, cancel_after_epoch: int | None = None, cancel: threading.Event | None = None):
        self.events: list[tuple] = []
        self.cancel_after_epoch = cancel_after_epoch
        self.cancel = cancel

    def on_run_start(self, info):
        self.events.append(("start", info.start_epoch))

    def on_step_end(self, info):
        self.events.append(("step", info.epoch, info.global_step))

    def on_epoch_end(self, info):
        self.events.append(("epoch", info.epoch, info.val["f1"]))
        if self.cancel_after_epoch == info.epoch:
            self.cancel.set()

    def on_checkpoint_saved(self, info):
        self.events.append(("checkpoint", info.kind, info.epoch))

    def on_run_end(self, result):
        self.events.append(("end", result.status))


def test_training_on_real_tiles_beats_chance_and_evaluate_agrees(levir_samples, tmp_path):
    # No augmentation and a constant, higher learning rate: the point is to fit 7 real tiles in
    # a minute of CPU, not the recipe.
    config = tiny_config(base_channel=8, crop_size=128, crops_per_image=4, epochs=12, lr=0.005, warmup_ratio=0,
                         scheduler="constant", weight_decay=0, rotate_prob=0, color_jitter_prob=0, blur_prob=0,
                         window_size=256, window_overlap=0)
    result = Trainer(config, levir_samples, tmp_path).fit()

    change = torch.tensor([read_mask(p.label).mean() for p in list_split(levir_samples, "demo")]).mean().item()
    all_change_f1 = 2 * change / (1 + change)  # the F1 of calling every pixel change
    assert result.status == "completed"
    assert result.best["f1"] > max(0.5, all_change_f1 + 0.15), result.best

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best"]["f1"] == pytest.approx(result.best["f1"])
    assert set(metrics["best"]) >= {"epoch", "f1", "iou", "precision", "recall"}
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 13))
    assert {"loss", "f1", "iou", "precision", "recall"} <= set(metrics["history"][0]["train"])

    evaluated = evaluate_checkpoint(tmp_path / "best.pt", levir_samples, split="demo", device="cpu")
    assert evaluated["epoch"] == metrics["best"]["epoch"]
    for key in ("f1", "iou", "precision", "recall"):
        assert evaluated[key] == pytest.approx(metrics["best"][key], abs=1e-9)


def test_interrupted_run_resumed_ends_where_an_uninterrupted_one_does(levir_samples, tmp_path):
    config = tiny_config(epochs=3)
    straight = Trainer(config, levir_samples, tmp_path / "straight").fit()

    cancel = threading.Event()
    recorder = Recorder(cancel_after_epoch=1, cancel=cancel)
    first = Trainer(config, levir_samples, tmp_path / "resumed", hooks=[recorder], cancel=cancel).fit()
    assert first.status == "cancelled" and first.epochs_run == 1
    assert ("end", "cancelled") in recorder.events

    resumed = Trainer(config, levir_samples, tmp_path / "resumed").fit(resume=True)
    assert resumed.status == "completed" and resumed.epochs_run == 3
    final_straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    final_resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for name, tensor in final_straight["model"].items():
        assert torch.equal(tensor, final_resumed["model"][name]), name
    assert final_straight["global_step"] == final_resumed["global_step"]
    assert [h["val"]["f1"] for h in straight.history] == [h["val"]["f1"] for h in resumed.history]
    assert straight.best == resumed.best


def test_hooks_see_the_run_in_order_and_cancellation_is_checked_every_step(levir_samples, tmp_path):
    cancel = threading.Event()
    recorder = Recorder()
    config = tiny_config(epochs=2)
    result = Trainer(config, levir_samples, tmp_path, hooks=[recorder], cancel=cancel).fit()
    kinds = [e[0] for e in recorder.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    steps = [e for e in recorder.events if e[0] == "step"]
    assert [s[2] for s in steps] == list(range(1, len(steps) + 1))
    first_epoch_end = kinds.index("epoch")
    assert kinds[first_epoch_end - 2 : first_epoch_end] == ["checkpoint", "checkpoint"]  # best, then last
    assert result.status == "completed"

    class CancelMidEpoch(TrainerHooks):
        def on_step_end(self, info):
            if info.global_step == 2:
                cancel.set()

    cancel.clear()
    recorder = Recorder()
    stopped = Trainer(config, levir_samples, tmp_path / "cancelled", hooks=[CancelMidEpoch(), recorder],
                      cancel=cancel).fit()
    assert stopped.status == "cancelled" and stopped.epochs_run == 0
    assert [e for e in recorder.events if e[0] == "step"][-1][2] == 2  # nothing ran after the request


def test_time_limit_stops_cleanly(levir_samples, tmp_path):
    config = tiny_config(epochs=50, time_limit_minutes=0.0001)
    result = Trainer(config, levir_samples, tmp_path).fit()
    assert result.status == "time_limit"
    assert result.epochs_run < 50


def test_early_stopping_on_validation_f1(levir_samples, tmp_path):
    # lr tiny enough that validation F1 cannot improve after the first epoch.
    config = tiny_config(epochs=10, patience=2, min_delta=0.5, lr=1e-9, warmup_ratio=0, scheduler="constant")
    result = Trainer(config, levir_samples, tmp_path).fit()
    assert result.status == "early_stopped"
    assert result.epochs_run == 3  # best at 1, then 2 epochs without a gain above min_delta
