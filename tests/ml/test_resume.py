"""Checkpoints inside an epoch and on a stop, and resuming from them: nothing is trained twice or
lost, and the result is bit for bit the uninterrupted run's (CPU, tiny synthetic data)."""

import argparse
import threading

import pytest
import torch
from torch.utils.data import DataLoader

from snunet_cbam.data.dataset import EpochShuffleSampler, EvalPairDataset, PairLoader, TrainPairDataset
from snunet_cbam.data.layouts import list_split
from snunet_cbam.hooks import TrainerHooks
from snunet_cbam.synthetic import make_synthetic_dataset
from snunet_cbam.trainer import Trainer

from .conftest import tiny_config

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 5  # 10 training pairs x 2 crops / batch 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    summary = make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), pairs=14, size=64, seed=1)
    assert summary.splits == {"train": 10, "val": 2, "test": 2}
    return summary.root


def config(**overrides):
    values = dict(train_split="train", val_split="val", test_split=None, epochs=3, log_every_steps=1)
    return tiny_config(**{**values, **overrides})


class Recorder(TrainerHooks):
    """Records what the hooks are told; sets ``cancel`` once a listed global step is reported, or at
    an epoch's end."""

    def __init__(self, cancel: threading.Event | None = None, at_steps=(), at_epoch_end=()):
        self.cancel, self.at_steps, self.at_epoch_end = cancel, set(at_steps), set(at_epoch_end)
        self.starts, self.steps, self.checkpoints, self.epochs = [], [], [], []

    def on_run_start(self, info):
        self.starts.append(info)

    def on_step_end(self, info):
        self.steps.append(info)
        if info.global_step in self.at_steps:
            self.cancel.set()

    def on_checkpoint_saved(self, info):
        self.checkpoints.append(info)

    def on_epoch_end(self, info):
        self.epochs.append(info)
        if info.epoch in self.at_epoch_end:
            self.cancel.set()


def load(path):
    return torch.load(path, weights_only=False)


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_seconds(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def run_with_stops(cfg, data, out, stop_at_steps, hooks=()):
    """Train to the end, stopped by the cancel token after each of ``stop_at_steps`` (global steps)
    and resumed each time; the results, first to last."""
    cancel = threading.Event()
    recorder = Recorder(cancel, at_steps=stop_at_steps)
    results = []
    for _ in range(len(stop_at_steps) + 1):
        cancel.clear()
        results.append(Trainer(cfg, data, out, hooks=[recorder, *hooks], cancel=cancel).fit(resume=bool(results)))
    return results, recorder


def test_the_sampler_starts_at_an_offset_of_the_epochs_permutation():
    sampler = EpochShuffleSampler(10, seed=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start=4)
    assert list(sampler) == whole[4:] and len(sampler) == 6
    sampler.set_epoch(2, start=12)  # past the end: nothing left
    assert list(sampler) == [] and len(sampler) == 0
    sampler.set_epoch(3)  # a new epoch starts at 0 again
    assert len(sampler) == 10
    with pytest.raises(ValueError):
        sampler.set_epoch(3, start=-1)


def test_a_run_stopped_inside_epochs_and_resumed_is_bit_identical_to_an_uninterrupted_one(data, tmp_path):
    cfg = config(ema_decay=0.9)  # the weight average's state must resume exactly too
    straight = Trainer(cfg, data, tmp_path / "straight").fit()

    # Stopped inside the first epoch (no epoch-end checkpoint exists yet) and inside the third.
    results, recorder = run_with_stops(cfg, data, tmp_path / "stopped", stop_at_steps=[2, 13])
    assert [r.status for r in results] == ["cancelled", "cancelled", "completed"]
    assert [r.epochs_run for r in results] == [0, 2, 3]
    partial = [c for c in recorder.checkpoints if c.step_in_epoch]
    assert [(c.kind, c.epoch, c.step_in_epoch, c.global_step) for c in partial] == [
        ("last", 0, 2, 2), ("last", 2, 3, 13)]

    final_straight, final_resumed = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "stopped" / "last.pt")
    assert same_weights(final_straight["model"], final_resumed["model"])
    assert same_weights(final_straight["ema"]["model"], final_resumed["ema"]["model"])
    assert same_weights(final_straight["optimizer"]["state"][0], final_resumed["optimizer"]["state"][0])
    assert final_resumed["global_step"] == final_straight["global_step"] == 3 * STEPS_PER_EPOCH
    # The epochs' metrics (train metrics summed over the interrupted epoch too) are the same.
    assert without_seconds(results[-1].history) == without_seconds(straight.history)
    assert results[-1].best == straight.best
    assert same_weights(load(tmp_path / "straight" / "best.pt")["model"],
                        load(tmp_path / "stopped" / "best.pt")["model"])


def test_every_step_is_trained_and_reported_once_and_skipped_samples_are_not_loaded(data, tmp_path, monkeypatch):
    loaded = []
    original = TrainPairDataset.__getitem__

    def counting_getitem(self, key):
        loaded.append(key)
        return original(self, key)

    monkeypatch.setattr(TrainPairDataset, "__getitem__", counting_getitem)
    cfg = config(epochs=2)
    cancel = threading.Event()
    first = Recorder(cancel, at_steps=[7])  # step 2 of epoch 2
    Trainer(cfg, data, tmp_path, hooks=[first], cancel=cancel).fit()
    loaded_before = list(loaded)
    loaded.clear()
    second = Recorder()
    result = Trainer(cfg, data, tmp_path, hooks=[second]).fit(resume=True)

    assert result.status == "completed"
    assert [s.global_step for s in first.steps + second.steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [(s.epoch, s.step_in_epoch) for s in second.steps] == [(2, 3), (2, 4), (2, 5)]
    # The resumed run loads epoch 2's samples from the 9th on (steps 3-5 of batch 4) and no other.
    sampler = EpochShuffleSampler(2 * 10, cfg.seed)
    sampler.set_epoch(2)
    order = list(sampler)
    assert loaded == order[8:8 + 3 * 4]
    assert not set(loaded) & set(loaded_before[:-4])  # (the first run had fetched the batch it did not train)


def test_checkpoints_are_written_inside_the_epoch_every_checkpoint_every_s(data, tmp_path):
    recorder = Recorder()

    class CheckOnDisk(TrainerHooks):
        def on_checkpoint_saved(self, info):
            state = load(info.path)
            assert (state["epoch"], state["global_step"], state["step_in_epoch"]) == (
                info.epoch, info.global_step, info.step_in_epoch)

    Trainer(config(epochs=2), data, tmp_path, hooks=[recorder, CheckOnDisk()], checkpoint_every_s=0).fit()
    inside = [c for c in recorder.checkpoints if c.step_in_epoch]
    assert [c.global_step for c in inside] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert {c.kind for c in inside} == {"last"}
    assert [c.step_in_epoch for c in inside] == [1, 2, 3, 4, 5] * 2
    assert [c.epoch for c in inside] == [0] * 5 + [1] * 5  # the last completed epoch
    at_ends = [c for c in recorder.checkpoints if not c.step_in_epoch]
    assert [(c.kind, c.epoch, c.global_step) for c in at_ends if c.kind == "last"] == [("last", 1, 5), ("last", 2, 10)]
    assert [c.finished for c in at_ends if c.kind == "last"] == [False, True]

    hourly = Recorder()
    Trainer(config(epochs=1), data, tmp_path / "hourly", hooks=[hourly], checkpoint_every_s=3600).fit()
    assert all(c.step_in_epoch == 0 for c in hourly.checkpoints)


def test_a_stop_during_validation_keeps_the_epochs_training_and_only_validation_is_rerun(data, tmp_path):
    cfg = config(epochs=2)
    straight = Trainer(cfg, data, tmp_path / "straight").fit()

    # Set after the epoch's last step: the next check is the validation pass's first image.
    results, recorder = run_with_stops(cfg, data, tmp_path / "stopped", stop_at_steps=[STEPS_PER_EPOCH])
    assert results[0].status == "cancelled" and results[0].epochs_run == 0
    assert recorder.epochs and recorder.epochs[0].epoch == 1  # (from the resumed run)
    stopped_checkpoint = recorder.checkpoints[0]
    assert (stopped_checkpoint.epoch, stopped_checkpoint.step_in_epoch) == (0, STEPS_PER_EPOCH)
    resumed_steps = [s for s in recorder.steps if s.global_step > STEPS_PER_EPOCH]
    assert [s.epoch for s in resumed_steps] == [2] * STEPS_PER_EPOCH  # no step of epoch 1 again
    assert len(recorder.steps) == 2 * STEPS_PER_EPOCH
    assert without_seconds(results[-1].history) == without_seconds(straight.history)
    assert same_weights(load(tmp_path / "straight" / "last.pt")["model"],
                        load(tmp_path / "stopped" / "last.pt")["model"])


def test_a_stop_during_the_end_of_the_run_keeps_the_checkpoints_and_a_resume_only_finishes(data, tmp_path):
    cfg = config(epochs=2, test_split="test")
    cancel = threading.Event()
    recorder = Recorder(cancel, at_epoch_end=[2])  # training is over; threshold and test are not
    stopped = Trainer(cfg, data, tmp_path, hooks=[recorder], cancel=cancel).fit()
    assert stopped.status == "cancelled" and stopped.epochs_run == 2
    assert stopped.threshold is None and stopped.test is None
    assert load(tmp_path / "last.pt")["finished"] == "completed"
    assert "threshold" not in load(tmp_path / "best.pt")

    resumed_recorder = Recorder()
    resumed = Trainer(cfg, data, tmp_path, hooks=[resumed_recorder]).fit(resume=True)
    assert resumed.status == "completed" and resumed.epochs_run == 2
    assert resumed_recorder.steps == [] and resumed_recorder.epochs == []
    assert resumed.threshold is not None and resumed.test is not None
    assert load(tmp_path / "best.pt")["threshold"] == resumed.threshold


def test_an_early_stopped_run_resumed_trains_no_epoch_and_stays_early_stopped(data, tmp_path):
    # lr tiny enough that validation F1 cannot improve by min_delta after the first epoch.
    cfg = config(epochs=10, patience=2, min_delta=0.5, lr=1e-9, warmup_ratio=0, scheduler="constant",
                 min_epochs_fraction=0)
    first = Recorder()
    result = Trainer(cfg, data, tmp_path, hooks=[first]).fit()
    assert result.status == "early_stopped" and result.epochs_run == 3
    assert [c.finished for c in first.checkpoints if c.kind == "last"] == [False, False, True]
    assert load(tmp_path / "last.pt")["finished"] == "early_stopped"

    again = Recorder()
    resumed = Trainer(cfg, data, tmp_path, hooks=[again]).fit(resume=True)
    assert resumed.status == "early_stopped" and resumed.epochs_run == 3
    assert again.steps == [] and again.epochs == [] and again.checkpoints == []
    assert resumed.threshold is not None  # the end of the run was done again
    assert resumed.history == result.history


def test_a_resumed_run_is_told_where_it_starts(data, tmp_path):
    cfg = config(epochs=2)
    results, recorder = run_with_stops(cfg, data, tmp_path, stop_at_steps=[STEPS_PER_EPOCH + 2])
    fresh, resumed = recorder.starts
    assert (fresh.start_epoch, fresh.start_step, fresh.history) == (1, 0, ())
    assert (resumed.start_epoch, resumed.start_step) == (2, STEPS_PER_EPOCH + 2)
    assert resumed.history == tuple(results[0].history) and [h["epoch"] for h in resumed.history] == [1]


def test_a_time_limit_inside_an_epoch_ends_in_a_checkpoint(data, tmp_path):
    result = Trainer(config(epochs=50, time_limit_minutes=0.0001), data, tmp_path).fit()
    assert result.status == "time_limit"
    state = load(tmp_path / "last.pt")
    assert state["finished"] is None and state["global_step"] == state["step_in_epoch"] + 5 * state["epoch"]


class SetAfter:
    """A cancel token that is set from its ``n``th look on."""

    def __init__(self, n: int):
        self.n, self.looks = n, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.n


def test_evaluation_stops_between_images_when_its_cancel_token_is_set(data):
    from snunet_cbam.checkpoint import build_model
    from snunet_cbam.runtime import Precision
    from snunet_cbam.scoring import EvalSettings, EvaluationStopped, evaluate_model

    cfg = config()
    model = build_model(cfg)
    loader = DataLoader(EvalPairDataset(PairLoader(list_split(data, "val")), cfg.normalize), batch_size=1)
    images = []
    kwargs = dict(precision=Precision.choose(torch.device("cpu"), False), on_image=lambda i, n: images.append(i))
    settings = EvalSettings.from_config(cfg)
    with pytest.raises(EvaluationStopped):
        evaluate_model(model, loader, torch.device("cpu"), settings, cancel=SetAfter(2), **kwargs)
    assert images == [1]  # the second image was not scored
    assert model.training  # left as it was found
    images.clear()
    never = threading.Event()
    assert (evaluate_model(model, loader, torch.device("cpu"), settings, cancel=never, **kwargs)
            == evaluate_model(model, loader, torch.device("cpu"), settings, **kwargs))


def test_cdtrain_train_takes_checkpoint_every():
    from snunet_cbam.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--data", "d", "--checkpoint-every", "300"])
    assert args.checkpoint_every == 300.0
    assert parser.parse_args(["train", "--data", "d"]).checkpoint_every is None
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--checkpoint-every", "-1"])
