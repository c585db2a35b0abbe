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


def test_training_on_real_tiles_beats_chance_and_evaluate_agrees(trained_run, levir_samples):
    out, result = trained_run
    change = torch.tensor([read_mask(p.label).mean() for p in list_split(levir_samples, "demo")]).mean().item()
    all_change_f1 = 2 * change / (1 + change)  # the F1 of calling every pixel change
    assert result.status == "completed"
    assert result.best["f1"] > max(0.5, all_change_f1 + 0.15), result.best

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["f1"] == pytest.approx(result.best["f1"])
    assert set(metrics["best"]) >= {"epoch", "f1", "iou", "precision", "recall"}
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 13))
    assert {"loss", "f1", "iou", "precision", "recall"} <= set(metrics["history"][0]["train"])

    # evaluate scores the best checkpoint at its tuned threshold, exactly as the run's end did.
    evaluated = evaluate_checkpoint(out / "best.pt", levir_samples, split="demo", device="cpu")
    assert evaluated["epoch"] == metrics["best"]["epoch"]
    assert evaluated["threshold"] == metrics["threshold"]["threshold"] == result.threshold
    for key in ("f1", "iou", "precision", "recall"):
        assert evaluated[key] == pytest.approx(metrics["threshold"][key], abs=1e-3)


def test_the_tuned_threshold_is_stored_and_never_worse_than_the_default(trained_run):
    out, result = trained_run
    state = torch.load(out / "best.pt", weights_only=False)
    assert state["threshold"] == result.threshold
    assert 0.02 <= result.threshold <= 0.98
    # Chosen on the same validation data: at least as good as 0.5 there (up to the bin width).
    assert result.val_at_threshold["f1"] >= result.best["f1"] - 2e-3


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
    config = tiny_config(epochs=2, log_every_steps=1)
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
    config = tiny_config(epochs=10, patience=2, min_delta=0.5, lr=1e-9, warmup_ratio=0, scheduler="constant",
                         min_epochs_fraction=0)
    result = Trainer(config, levir_samples, tmp_path).fit()
    assert result.status == "early_stopped"
    assert result.epochs_run == 3  # best at 1, then 2 epochs without a gain above min_delta


def test_early_stopping_waits_for_the_minimum_fraction_of_the_schedule(levir_samples, tmp_path):
    config = tiny_config(epochs=10, patience=2, min_delta=0.5, lr=1e-9, warmup_ratio=0, scheduler="constant",
                         min_epochs_fraction=0.6)
    result = Trainer(config, levir_samples, tmp_path).fit()
    assert result.status == "early_stopped"
    assert result.epochs_run == 6  # patience ran out at 3, but not before 60% of 10 epochs


class StepLog(TrainerHooks):
    def __init__(self):
        self.steps = []

    def on_step_end(self, info):
        self.steps.append(info)


def test_a_resumed_run_with_more_epochs_continues_its_learning_rate_without_a_jump(levir_samples, tmp_path):
    first = StepLog()
    Trainer(tiny_config(epochs=2, log_every_steps=1, warmup_ratio=0.2), levir_samples, tmp_path,
            hooks=[first]).fit()
    second = StepLog()
    longer = tiny_config(epochs=5, log_every_steps=1, warmup_ratio=0.2)
    result = Trainer(longer, levir_samples, tmp_path, hooks=[second]).fit(resume=True)
    assert result.status == "completed" and result.epochs_run == 5
    before, after = [s.lr for s in first.steps], [s.lr for s in second.steps]
    step_down = before[-2] - before[-1]
    assert after[0] <= before[-1]  # no jump up where the run resumed
    assert before[-1] - after[0] <= 1.01 * step_down  # nor a cliff: one ordinary step of decay
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert after[-1] < 0.1 * before[-1]  # decayed to the floor by the new end


def test_step_metrics_are_read_from_the_device_every_n_steps(levir_samples, tmp_path, monkeypatch):
    config = tiny_config(epochs=1, log_every_steps=3, crops_per_image=4, batch_size=2, patience=None)
    log = StepLog()
    reads = []
    original_float, original_tolist = torch.Tensor.__float__, torch.Tensor.tolist

    def counting_float(self):
        reads.append("float")
        return original_float(self)

    def counting_tolist(self):
        reads.append("tolist")
        return original_tolist(self)

    class CountStepsRead(TrainerHooks):
        def on_run_start(self, info):
            reads.clear()

        def on_epoch_end(self, info):
            self.during_training = len(reads)

    counter = CountStepsRead()
    monkeypatch.setattr(torch.Tensor, "__float__", counting_float)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    Trainer(config, levir_samples, tmp_path, hooks=[log, counter]).fit()
    steps = log.steps[-1].step_in_epoch
    assert steps == 14  # 7 tiles x 4 crops / batch 2
    assert [s.step_in_epoch for s in log.steps] == [3, 6, 9, 12, 14]
    assert [s.steps for s in log.steps] == [3, 3, 3, 3, 2]
    # A handful of reads per report and per epoch (the sampler's order, validation), not per step.
    assert counter.during_training < 2 * steps, reads


def test_a_diverged_run_stops_with_a_clear_error_instead_of_training_on_nan(levir_samples, tmp_path):
    from snunet_cbam.trainer import NonFiniteLossError

    config = tiny_config(epochs=2, lr=1e30, warmup_ratio=0, scheduler="constant", log_every_steps=1)
    with pytest.raises(NonFiniteLossError, match="training loss is nan"):
        Trainer(config, levir_samples, tmp_path).fit()


def test_the_weight_average_is_what_is_validated_checkpointed_and_exported(levir_samples, tmp_path):
    from snunet_cbam.checkpoint import model_from_checkpoint

    config = tiny_config(epochs=2, ema_decay=0.9, tune_threshold=False)
    result = Trainer(config, levir_samples, tmp_path).fit()
    state = torch.load(tmp_path / "best.pt", weights_only=False)
    averaged, trained = state["ema"]["model"], state["model"]
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained if trained[k].is_floating_point())
    model, _, _ = model_from_checkpoint(tmp_path / "best.pt")
    assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())
    # The best epoch's validation F1 is the average's: scoring the exported weights the same way
    # (no flips, threshold 0.5) gives it back.
    evaluated = evaluate_checkpoint(tmp_path / "best.pt", levir_samples, split="demo", device="cpu",
                                    settings=config.model_copy(update={"tta": "none"}))
    assert evaluated["f1"] == pytest.approx(result.best["f1"], abs=1e-9)
