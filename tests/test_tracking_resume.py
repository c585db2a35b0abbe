"""A job resumed by later attempts, on a real MLflow (SQLite): the job registers one model version
whatever its attempts did or raced to do, and a resumed run's metric history holds each step and
each epoch once."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from consumer.tracking import MlflowHooks, Verdict, find_logged_model, log_best_model, register_and_promote
from consumer.tracking import job_tracker as job_tracker_module
from consumer.tracking.job_tracker import MlflowJobTracker
from consumer.tracking.model import checkpoint_digest
from consumer.tracking.registry import REASON_TAG
from schemas import TrainJob, TrainRequest
from snunet_cbam.checkpoint import load_checkpoint, save_checkpoint
from snunet_cbam.hooks import EpochInfo, TrainResult
from tests.test_tracking import (  # noqa: F401 - crafted and store are fixtures
    _aliases,
    _cheap_run,
    _result,
    _start_info,
    _step,
    _tags,
    crafted,
    store,
)

STEPS_PER_EPOCH = 10  # as _start_info and _step say


# --- metric history -----------------------------------------------------------------------------------
def _record(epoch: int, f1: float) -> dict:
    """An epoch as the trainer's history keeps it (``_end_epoch``)."""
    return {"epoch": epoch, "lr": 1e-3 / epoch, "seconds": 10.0 + epoch,
            "train": {"loss": 0.5 / epoch, "f1": f1 + 0.05}, "val": {"loss": 0.6 / epoch, "f1": f1, "tp": 7.0}}


def _epoch_end(record: dict, best_f1: float) -> EpochInfo:
    return EpochInfo(epoch=record["epoch"], epochs=4, lr=record["lr"], train=record["train"], val=record["val"],
                     is_best=record["val"]["f1"] >= best_f1, best_epoch=record["epoch"], best_f1=best_f1,
                     seconds=record["seconds"])


def _train(hooks: MlflowHooks, steps: range, records: dict[int, dict]) -> None:
    """Report ``steps``, and the end of each epoch whose last step is among them."""
    for step in steps:
        hooks.on_step_end(_step(step))
        epoch, end_of_epoch = divmod(step, STEPS_PER_EPOCH)
        if end_of_epoch == 0:
            best = max(records[e]["val"]["f1"] for e in range(1, epoch + 1))
            hooks.on_epoch_end(_epoch_end(records[epoch], best))


def _resumed(tmp_path, start_step: int, history: list[dict]):
    return dataclasses.replace(_start_info(tmp_path), start_epoch=start_step // STEPS_PER_EPOCH + 1,
                               start_step=start_step, history=tuple(history))


def _steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _series(client, run_id):
    """Every metric of the run: key -> sorted (step, value)."""
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def test_a_resumed_run_logs_each_step_and_each_epoch_once(store, tmp_path):  # noqa: F811
    client = store.client
    run_id = client.create_run(store.experiment_id).info.run_id
    records = {e: _record(e, f1) for e, f1 in ((1, 0.4), (2, 0.6), (3, 0.5), (4, 0.7))}
    # The killed attempt got to step 30 (end of epoch 3), but its last checkpoint was at step 20.
    killed = MlflowHooks(client, run_id, step_flush_every=5)
    killed.on_run_start(_start_info(tmp_path))
    _train(killed, range(1, 31), records)
    assert killed.flush(30)
    killed.close()
    first_epoch_3 = [m for m in client.get_metric_history(run_id, "val_f1") if m.step == 3]

    resumed = MlflowHooks(client, run_id, step_flush_every=5)
    resumed.on_run_start(_resumed(tmp_path, 20, [records[1], records[2]]))
    _train(resumed, range(21, 41), records)
    resumed.on_run_end(_result(tmp_path))
    assert resumed.health.ok, resumed.health

    for key in ("val_f1", "train_f1", "lr", "epoch_seconds", "best_val_f1_so_far"):
        assert _steps(client, run_id, key) == [1, 2, 3, 4], key
    for key in ("step_loss", "step_f1", "step_lr"):
        assert _steps(client, run_id, key) == list(range(1, 41)), key
    # The epoch both attempts trained keeps the values first logged.
    assert [m for m in client.get_metric_history(run_id, "val_f1") if m.step == 3] == first_epoch_3
    assert client.get_run(run_id).data.tags["start_step"] == "20"


def test_the_history_epochs_a_run_lacks_are_logged_as_on_epoch_end_would_have(store, tmp_path):  # noqa: F811
    client = store.client
    history = [_record(1, 0.4), _record(2, 0.6), _record(3, 0.5)]
    # The killed attempt's sender sent epoch 1 only.
    run_id = client.create_run(store.experiment_id).info.run_id
    killed = MlflowHooks(client, run_id)
    killed.on_epoch_end(_epoch_end(history[0], 0.4))
    killed.close()

    resumed = MlflowHooks(client, run_id)
    resumed.on_run_start(_resumed(tmp_path, 3 * STEPS_PER_EPOCH, history))
    assert resumed.flush(30)
    resumed.close()
    assert resumed.health.ok, resumed.health

    # The reference: the three epochs logged as they ended, with the trainer's running best.
    reference_run = client.create_run(store.experiment_id).info.run_id
    reference = MlflowHooks(client, reference_run)
    for record, best in zip(history, (0.4, 0.6, 0.6)):
        reference.on_epoch_end(_epoch_end(record, best))
    reference.close()
    assert _series(client, run_id) == _series(client, reference_run)
    assert _series(client, run_id)["best_val_f1_so_far"] == [(1, 0.4), (2, 0.6), (3, 0.6)]


class _HistoryClient:
    """Answers the resume read only when released; records what is logged."""

    def __init__(self, last_step: int):
        self.last_step, self.release, self.logged = last_step, threading.Event(), []

    def get_metric_history(self, run_id, key):
        assert self.release.wait(30)
        return [Metric(key, 1.0, 0, self.last_step)] if key == "step_loss" else []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.logged += [m.step for m in metrics if m.key == "step_loss"]


def test_the_resume_read_runs_in_the_sender_never_in_the_training_thread(tmp_path):
    client = _HistoryClient(last_step=25)
    hooks = MlflowHooks(client, "run-resumed", step_flush_every=5)
    started = time.monotonic()
    hooks.on_run_start(_resumed(tmp_path, 20, []))
    for step in range(21, 31):
        hooks.on_step_end(_step(step))
    assert time.monotonic() - started < 0.5  # MLflow has not answered yet: training went on
    client.release.set()
    assert hooks.flush(10)
    hooks.close()
    assert client.logged == [26, 27, 28, 29, 30] and hooks.health.ok


# --- one model version per job ------------------------------------------------------------------------
def _first(champion):
    return Verdict(True, "first") if champion is None else Verdict(False, f"v{champion.version} stays")


def _never_judged(champion):
    raise AssertionError("judged again")


def _dies(champion):
    raise RuntimeError("the worker died while judging")


def _run_versions(client, name, run_id):
    return sorted(int(mv.version) for mv in client.search_model_versions(f"name = '{name}'") if mv.run_id == run_id)


def _register(client, run_id, name, judge, **kwargs):
    return register_and_promote(client, run_id, name, 0.5, judge=judge, tags={"job_id": f"job-{run_id}"},
                                settle_s=0, **kwargs)


def test_registering_a_job_again_returns_its_recorded_decision_without_judging(store, tmp_path):  # noqa: F811
    client, name = store.client, "cd-again"
    champion_run, kept_run = (_cheap_run(client, store.experiment_id, tmp_path) for _ in range(2))
    promoted = _register(client, champion_run, name, _first)
    kept = _register(client, kept_run, name, _first)
    assert (promoted.version, promoted.promoted, kept.version, kept.promoted) == (1, True, 2, False)
    assert kept.previous_production_version == 1 and kept.reason == "v1 stays"

    assert _register(client, champion_run, name, _never_judged) == promoted
    assert _register(client, kept_run, name, _never_judged) == kept
    assert _run_versions(client, name, champion_run) == [1] and _run_versions(client, name, kept_run) == [2]
    assert _aliases(client, name) == {"production": "1", "staging": "2"}


def test_a_version_created_by_an_attempt_that_died_before_deciding_is_finished(store, tmp_path):  # noqa: F811
    client, name = store.client, "cd-died-judging"
    run_id = _cheap_run(client, store.experiment_id, tmp_path)
    with pytest.raises(RuntimeError):
        _register(client, run_id, name, _dies)
    assert "promotion" not in _tags(client, name, 1) and _aliases(client, name) == {"staging": "1"}

    result = _register(client, run_id, name, _first)
    assert (result.version, result.promoted, result.reason, result.stage) == (1, True, "first", "Production")
    assert _run_versions(client, name, run_id) == [1]
    assert _aliases(client, name) == {"production": "1", "staging": "1"}


class _DiesRecordingTheDecision(MlflowClient):
    def set_model_version_tag(self, name, version, key, value):
        if key == REASON_TAG:
            raise RuntimeError("the worker died after promoting")
        super().set_model_version_tag(name, version, key, value)


def test_a_version_promoted_by_an_attempt_that_died_before_recording_it_stays_promoted(store, tmp_path):  # noqa: F811
    client, name = store.client, "cd-died-recording"
    run_id = _cheap_run(client, store.experiment_id, tmp_path)
    with pytest.raises(RuntimeError):
        _register(_DiesRecordingTheDecision(store.uri), run_id, name, _first)
    assert _aliases(client, name) == {"production": "1", "staging": "1"}
    assert "promotion" not in _tags(client, name, 1)

    result = _register(client, run_id, name, _never_judged)
    assert (result.version, result.promoted, result.alias, result.stage) == (1, True, "production", "Production")
    assert result.reason == ("already in production, promoted over no production version at the request of "
                             "another attempt of this job")
    assert _tags(client, name, 1)["promotion"] == "promoted"


class _CreatesTogether(MlflowClient):
    """Two attempts that both found no version: each creates one before either looks again."""

    def __init__(self, uri, together: threading.Barrier):
        super().__init__(uri)
        self.together = together

    def create_model_version(self, *args, **kwargs):
        self.together.wait(30)  # both looked and found none
        created = super().create_model_version(*args, **kwargs)
        self.together.wait(30)  # both created
        return created


def test_two_attempts_racing_to_register_a_job_end_with_one_version(store, tmp_path):  # noqa: F811
    name = "cd-same-job-race"
    run_id = _cheap_run(store.client, store.experiment_id, tmp_path)
    together = threading.Barrier(2)
    results, errors = [], []

    def attempt():
        try:
            results.append(register_and_promote(_CreatesTogether(store.uri, together), run_id, name, 0.5,
                                                judge=_first, tags={"job_id": "job-race"}, settle_s=0.1))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert sorted((r.version, r.promoted) for r in results) == [(1, True), (1, True)]
    assert _run_versions(store.client, name, run_id) == [1]
    with pytest.raises(MlflowException, match="not found"):
        store.client.get_model_version(name, "2")
    assert _aliases(store.client, name) == {"production": "1", "staging": "1"}


def test_a_duplicate_left_behind_is_deleted_and_its_aliases_go_to_the_jobs_version(store, tmp_path):  # noqa: F811
    client, name = store.client, "cd-leftover"
    run_id = _cheap_run(client, store.experiment_id, tmp_path)
    source = client.get_logged_model(find_logged_model(client, run_id)).artifact_location
    client.create_registered_model(name)
    # An attempt that raced and died before cleaning up, and a duplicate that (by hand, or by an
    # older worker) even reached production.
    for _ in range(2):
        client.create_model_version(name, source=source, run_id=run_id)
    client.set_registered_model_alias(name, "production", "2")

    result = _register(client, run_id, name, _never_judged)
    assert (result.version, result.promoted) == (1, True)
    assert _run_versions(client, name, run_id) == [1]
    assert _aliases(client, name) == {"production": "1"}


# --- the logged model ---------------------------------------------------------------------------------
def test_the_checkpoint_digest_follows_the_model_not_the_file(crafted, tmp_path):  # noqa: F811
    state = load_checkpoint(crafted.half)
    resaved = tmp_path / "resaved.pt"
    save_checkpoint(resaved, {**state, "optimizer": {"unrelated": torch.zeros(3)}})
    assert checkpoint_digest(resaved) == checkpoint_digest(crafted.half) == checkpoint_digest(state)
    assert checkpoint_digest({**state, "threshold": 0.123}) != checkpoint_digest(state)
    assert checkpoint_digest(crafted.perfect) != checkpoint_digest(crafted.half)


def _must_not_export(*args, **kwargs):
    raise AssertionError("the best model was exported again")


@pytest.mark.slow
def test_later_attempts_reuse_the_logged_model_and_the_jobs_version(store, crafted, tmp_path,  # noqa: F811
                                                                    monkeypatch):
    tracker = MlflowJobTracker(store.client, "cdtrain-tests")
    name = "cd-resumed-job"
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/drawn/", register_model=True, model_name=name))
    best, metrics = tmp_path / "best.pt", tmp_path / "metrics.json"
    shutil.copyfile(crafted.perfect, best)
    metrics.write_text("{}")
    result = TrainResult(status="completed", epochs_run=1, best={"epoch": 1, "f1": 1.0}, history=[], test=None,
                         best_checkpoint=best, last_checkpoint=best, metrics_path=metrics)

    run_id = tracker.start_run(job, crafted.config, attempt=0)
    # The first attempt logged the best model, then its worker was killed before registering it.
    logged = log_best_model(store.client, run_id, best)
    monkeypatch.setattr(job_tracker_module, "log_best_model", _must_not_export)

    assert tracker.start_run(job, crafted.config, attempt=1) == run_id
    second = tracker.finish(run_id, result, job, crafted.data, crafted.config)
    assert (second.version, second.alias) == ("1", "production")
    assert _tags(store.client, name, 1)["logged_model_id"] == logged.model_id

    # A third attempt (the second was killed before reporting): same outcome, nothing judged again.
    scored = []
    monkeypatch.setattr(job_tracker_module, "validation_scorer", lambda *args: scored.append)
    assert tracker.start_run(job, crafted.config, attempt=2) == run_id
    assert tracker.finish(run_id, result, job, crafted.data, crafted.config) == second
    assert scored == []
    assert [o.model_id for o in store.client.get_run(run_id).outputs.model_outputs] == [logged.model_id]
    assert _run_versions(store.client, name, run_id) == [1]
