"""MLflow tracking against a real MLflow: a SQLite-backed store, and one end-to-end test through a
real ``mlflow server`` (the REST path the workers use).

A tiny real training on the shared LEVIR-CD tiles feeds the run-logging tests; the registry
policy tests use cheap logged models (their content does not matter to the registry).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

t0 = time.monotonic()
import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import LoggedModelOutput, LoggedModelStatus  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import Model  # noqa: E402
from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # noqa: E402

MLFLOW_IMPORT_S = time.monotonic() - t0

from consumer.tracking import (  # noqa: E402
    CHECKPOINT_ARTIFACT,
    CONFIG_ARTIFACT,
    DEFAULT_PROMOTION_MARGIN,
    METRICS_ARTIFACT,
    MlflowHooks,
    PromotionJudge,
    Verdict,
    all_change_f1,
    config_params,
    ensure_experiment,
    fetch_checkpoint,
    find_logged_model,
    log_best_model,
    log_checkpoint,
    mlflow_run_status,
    register_and_promote,
    start_job_run,
    validation_scorer,
)
from consumer.tracking.registry import PromotionRequest, rightful_production  # noqa: E402
from consumer.tracking.job_tracker import MlflowJobTracker  # noqa: E402
from schemas import TrainJob, TrainRequest  # noqa: E402
from schemas.training import TrainConfig  # noqa: E402
from snunet_cbam.checkpoint import decision_threshold, model_from_checkpoint  # noqa: E402
from snunet_cbam.data.check import check_pairs  # noqa: E402
from snunet_cbam.data.dataset import to_tensor  # noqa: E402
from snunet_cbam.data.imageio import read_rgb  # noqa: E402
from snunet_cbam.data.layouts import list_split  # noqa: E402
from snunet_cbam.hooks import EpochInfo, RunStartInfo, StepInfo, TrainResult  # noqa: E402
from snunet_cbam.trainer import Trainer  # noqa: E402
from tests.crafted_models import (  # noqa: E402
    ALL_CHANGE_F1,
    constant_checkpoint,
    crafted_config,
    difference_checkpoint,
    draw_difference_dataset,
)
from tests.ml.conftest import levir_samples, tiny_config  # noqa: E402,F401 - levir_samples is a fixture

EPOCHS = 2


# --- stores and a trained run ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, "cdtrain-tests", artifact_location=(root / "artifacts").as_uri())
    return SimpleNamespace(uri=uri, client=client, experiment_id=experiment_id, root=root)


@pytest.fixture(scope="module")
def trained(store, levir_samples, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("train")
    run_id, created = start_job_run(store.client, "cdtrain-tests", job_id="job-1", dataset_uri="s3://bucket/levir",
                                    source="rest")
    assert created
    # Whole 256 px tiles in one window: the test split costs one forward per tile.
    config = tiny_config(epochs=EPOCHS, test_split="demo", window_size=256, window_overlap=0, log_every_steps=3)
    hooks = MlflowHooks(store.client, run_id, step_flush_every=2)
    started = time.monotonic()
    result = Trainer(config, levir_samples, out, hooks=[hooks]).fit()
    return SimpleNamespace(run_id=run_id, config=config, result=result, hooks=hooks, out=out,
                           train_s=time.monotonic() - started)


@pytest.fixture(scope="module")
def logged(store, trained):
    info = log_best_model(store.client, trained.run_id, trained.result.best_checkpoint)
    return info


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _tiles(root: Path, count: int):
    pairs = check_pairs(list_split(root, "demo"), "demo").valid[:count]
    return [(read_rgb(p.image_a), read_rgb(p.image_b)) for p in pairs]


def _raw_input(tiles, y: int, x: int, h: int, w: int) -> np.ndarray:
    """The logged model's input: RGB of A then B on channels, raw 0-255, float32 (N, 6, h, w)."""
    return np.stack([
        np.concatenate([a[y : y + h, x : x + w], b[y : y + h, x : x + w]], axis=2).transpose(2, 0, 1)
        for a, b in tiles
    ]).astype(np.float32)


def _checkpoint_probabilities(checkpoint: Path, tiles, y: int, x: int, h: int, w: int) -> np.ndarray:
    model, config, _ = model_from_checkpoint(checkpoint)
    model.eval()
    a = torch.stack([to_tensor(a[y : y + h, x : x + w], config.normalize) for a, _ in tiles])
    b = torch.stack([to_tensor(b[y : y + h, x : x + w], config.normalize) for _, b in tiles])
    with torch.no_grad():
        return torch.sigmoid(model(a, b)).numpy()


# --- run logging ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_holds_config_params_tags_and_per_epoch_metrics(store, trained):
    client, result = store.client, trained.result
    run = client.get_run(trained.run_id)
    assert trained.hooks.health.ok, trained.hooks.health
    assert result.status == "completed" and result.epochs_run == EPOCHS

    # The params are the fully resolved config, and they rebuild it exactly.
    assert run.data.params == config_params(trained.config.model_dump())
    rebuilt = TrainConfig.model_validate({k: yaml.safe_load(v) for k, v in run.data.params.items()})
    assert rebuilt == trained.config
    assert run.data.params["pos_weight"] == "null" and run.data.params["compile"] == "false"

    tags = run.data.tags
    assert tags["job_id"] == "job-1" and tags["dataset_uri"] == "s3://bucket/levir" and tags["source"] == "rest"
    assert (tags["device"], tags["precision"], tags["compiled"]) == ("cpu", "fp32", "false")  # amp off in tiny_config
    model, _, _ = model_from_checkpoint(result.best_checkpoint)
    assert int(tags["parameters"]) == sum(p.numel() for p in model.parameters())
    assert tags["train_status"] == "completed" and tags["epochs_run"] == str(EPOCHS)

    # Epoch metrics: one value per epoch at step=epoch, equal to the trainer's history.
    for prefix in ("train", "val"):
        for key in ("f1", "iou", "precision", "recall", "accuracy", "loss"):
            got = _history(client, trained.run_id, f"{prefix}_{key}")
            want = [(h["epoch"], pytest.approx(h[prefix][key])) for h in result.history]
            assert got == want, (prefix, key)
    assert _history(client, trained.run_id, "lr") == [(h["epoch"], pytest.approx(h["lr"])) for h in result.history]
    assert [s for s, _ in _history(client, trained.run_id, "epoch_seconds")] == list(range(1, EPOCHS + 1))

    # Step metrics: every log_every_steps steps and at each epoch's last step, batched.
    steps = int(run.data.tags["steps_per_epoch"])
    every = trained.config.log_every_steps
    reported = [(e - 1) * steps + k for e in range(1, EPOCHS + 1) for k in range(1, steps + 1)
                if k % every == 0 or k == steps]
    assert len(reported) < steps * EPOCHS  # fewer reads than steps: the point of the window
    for key in ("step_loss", "step_f1", "step_lr"):
        assert [s for s, _ in _history(client, trained.run_id, key)] == reported, key
    assert all(v > 0 for _, v in _history(client, trained.run_id, "step_lr"))


@pytest.mark.slow
def test_run_end_logs_best_and_test_metrics_and_artifacts(store, trained, tmp_path):
    client, result = store.client, trained.result
    best_epoch = int(result.best["epoch"])
    for key in ("f1", "iou", "precision", "recall", "accuracy"):
        assert _history(client, trained.run_id, f"best_val_{key}") == [(best_epoch, pytest.approx(result.best[key]))]
        assert _history(client, trained.run_id, f"test_{key}") == [(best_epoch, pytest.approx(result.test[key]))]
    assert client.get_run(trained.run_id).data.tags["best_epoch"] == str(best_epoch)
    assert _history(client, trained.run_id, "threshold") == [(best_epoch, pytest.approx(result.threshold))]
    assert _history(client, trained.run_id, "tuned_val_f1") == [(best_epoch, pytest.approx(result.val_at_threshold["f1"]))]

    names = {a.path for a in client.list_artifacts(trained.run_id)}
    assert {METRICS_ARTIFACT, CONFIG_ARTIFACT} <= names
    metrics = json.loads(Path(client.download_artifacts(trained.run_id, METRICS_ARTIFACT, str(tmp_path))).read_text())
    assert metrics == json.loads(result.metrics_path.read_text())
    assert metrics["test"]["f1"] == pytest.approx(result.test["f1"])
    config = yaml.safe_load(Path(client.download_artifacts(trained.run_id, CONFIG_ARTIFACT, str(tmp_path))).read_text())
    assert TrainConfig.model_validate(config) == trained.config


def test_job_runs_are_found_again_and_statuses_map(store):
    run_id, created = start_job_run(store.client, "cdtrain-tests", job_id="job-redelivered", dataset_uri="s3://b/x",
                                    source="bucket")
    again, created_again = start_job_run(store.client, "cdtrain-tests", job_id="job-redelivered",
                                         dataset_uri="s3://b/x", source="bucket")
    other, _ = start_job_run(store.client, "cdtrain-tests", job_id="job-other", dataset_uri="s3://b/x", source="bucket")
    assert created and not created_again and again == run_id and other != run_id
    assert store.client.get_run(run_id).data.tags["source"] == "bucket"
    # A worker shutdown left it KILLED ("cancelled"); the attempt that resumes it runs it again.
    tracker = MlflowJobTracker(store.client, "cdtrain-tests")
    tracker.fail(run_id, "cancelled")
    assert store.client.get_run(run_id).info.status == "KILLED"
    assert start_job_run(store.client, "cdtrain-tests", job_id="job-redelivered", dataset_uri="s3://b/x",
                         source="bucket") == (run_id, False)
    resumed = store.client.get_run(run_id)
    assert resumed.info.status == "RUNNING" and "failure_reason" not in resumed.data.tags
    assert [mlflow_run_status(s) for s in ("completed", "early_stopped", "time_limit", "cancelled", None)] == [
        "FINISHED", "FINISHED", "FINISHED", "KILLED", "FAILED"]


# --- the logged model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_logged_model_is_pt2_with_signature_and_belongs_to_the_run(store, trained, logged, tmp_path):
    client = store.client
    assert logged.serialization_format == "pt2" and logged.dynamic_hw
    assert logged.val_f1 == pytest.approx(trained.result.best["f1"])
    assert logged.epoch == trained.result.best["epoch"]
    model = client.get_logged_model(logged.model_id)
    assert model.status == LoggedModelStatus.READY and model.source_run_id == trained.run_id
    assert model.experiment_id == store.experiment_id  # the run's experiment, not the default one
    assert model.tags["val_f1"] == repr(logged.val_f1)
    assert find_logged_model(client, trained.run_id) == logged.model_id
    outputs = client.get_run(trained.run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(logged.model_id, trained.result.best["epoch"])]

    local = Path(mlflow.artifacts.download_artifacts(model.artifact_location, dst_path=str(tmp_path)))
    assert (local / "data" / "model.pt2").is_file() and (local / "input_example.json").is_file()
    mlmodel = Model.load(str(local / "MLmodel"))
    assert mlmodel.flavors["python_function"]["model_config"] == {"device": "cpu"}
    sig = mlmodel.signature
    assert sig.inputs.inputs[0].shape == (-1, 6, -1, -1) and sig.outputs.inputs[0].shape == (-1, 1, -1, -1)
    # The threshold tuned at the end of the run (stored in the checkpoint), not the config's default.
    _, config, state = model_from_checkpoint(trained.result.best_checkpoint)
    assert mlmodel.metadata["threshold"] == decision_threshold(state, config) and mlmodel.metadata["min_side"] == 16

    # The checkpoint rides along as a run artifact: what the registry scores a champion with.
    assert logged.checkpoint_artifact == CHECKPOINT_ARTIFACT == "checkpoint/best.pt"
    assert [a.path for a in client.list_artifacts(trained.run_id, "checkpoint")] == [CHECKPOINT_ARTIFACT]
    fetched = fetch_checkpoint(client, trained.run_id, tmp_path / "fetched")
    # The model alone: the validated weights, the config and the threshold, no optimiser state.
    _, fetched_config, fetched_state = model_from_checkpoint(fetched)
    assert fetched_config == config and decision_threshold(fetched_state, fetched_config) == decision_threshold(state, config)
    assert fetched_state["epoch"] == state["epoch"] and "optimizer" not in fetched_state
    assert all(torch.equal(v, state["model"][k]) for k, v in fetched_state["model"].items())
    assert fetched.stat().st_size < trained.result.best_checkpoint.stat().st_size / 2


@pytest.mark.slow
def test_logged_model_loads_with_pyfunc_and_matches_the_checkpoint(store, trained, logged, levir_samples):  # noqa: F811
    tiles = _tiles(levir_samples, 2)
    with _use_tracking_uri(store.uri):
        loaded = mlflow.pyfunc.load_model(logged.model_uri)
    # The example's size, and an odd batch/size (not a multiple of 16, not the example's).
    for count, (y, x, h, w) in ((2, (0, 0, 64, 64)), (1, (37, 11, 40, 56))):
        got = loaded.predict(_raw_input(tiles[:count], y, x, h, w))
        want = _checkpoint_probabilities(trained.result.best_checkpoint, tiles[:count], y, x, h, w)
        assert got.shape == (count, 1, h, w)
        assert np.all((got >= 0) & (got <= 1))
        np.testing.assert_allclose(got, want, atol=1e-5)


# --- the registry policy ---------------------------------------------------------------------------
# Real scoring of crafted models (tests/crafted_models.py) on a drawn split: "perfect" F1 1.0,
# "half" F1 2/3, "all_change" F1 = the split's all-change F1 (2/9, below any positive margin).
@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    folder = root / "checkpoints"
    folder.mkdir()
    return SimpleNamespace(
        data=draw_difference_dataset(root / "data"), config=crafted_config(),
        perfect=difference_checkpoint(folder / "perfect.pt", 20),
        half=difference_checkpoint(folder / "half.pt", 75),
        all_change=constant_checkpoint(folder / "all_change.pt", change=True),
    )


def _cheap_run(client, experiment_id, tmp_path) -> str:
    """A run with a READY logged model: what log_best_model leaves, minus the weights."""
    run_id = client.create_run(experiment_id).info.run_id
    model = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    folder = tmp_path / run_id
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors: {}\n")
    client.log_model_artifacts(model.model_id, str(folder))
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=1)])
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return run_id


def _register(store, crafted, tmp_path, name, checkpoint, *, val_f1=0.5, logs_checkpoint=True,
              margin=DEFAULT_PROMOTION_MARGIN):
    """One job's registration: a run (with ``checkpoint`` as its checkpoint artifact unless
    ``logs_checkpoint`` is False), judged by the worker's judge on the drawn split."""
    run_id = _cheap_run(store.client, store.experiment_id, tmp_path)
    if logs_checkpoint:
        log_checkpoint(store.client, run_id, checkpoint)
    judge = PromotionJudge(store.client, checkpoint, validation_scorer(crafted.data, crafted.config), margin=margin,
                           work_dir=tmp_path / f"champions-{run_id}")
    return register_and_promote(store.client, run_id, name, val_f1, judge=judge, settle_s=0)


def _version(client, name, alias):
    return int(client.get_model_version_by_alias(name, alias).version)


def _aliases(client, name):
    return {alias: str(version) for alias, version in (client.get_registered_model(name).aliases or {}).items()}


def _tags(client, name, version):
    return client.get_model_version(name, str(version)).tags


def test_all_change_f1_is_the_f1_of_calling_every_pixel_change():
    # 1 change pixel in 8: precision 1/8, recall 1 -> F1 2/9, whatever the model predicted.
    assert all_change_f1(tp=1, fp=0, fn=0, tn=7) == pytest.approx(2 / 9)
    assert all_change_f1(tp=0, fp=3, fn=1, tn=4) == pytest.approx(2 / 9)
    assert all_change_f1(0, 0, 0, 0) == 0.0


def test_a_first_version_below_the_quality_gate_stays_in_staging_and_says_why(store, crafted, tmp_path):
    client, name = store.client, "cd-gate"
    # A high val_f1 of its own means nothing: on its split, "change everywhere" scores the same.
    useless = _register(store, crafted, tmp_path, name, crafted.all_change, val_f1=0.9)
    assert (useless.version, useless.promoted, useless.alias, useless.stage) == (1, False, "staging", "Staging")
    assert "production" not in _aliases(client, name) and _version(client, name, "staging") == 1
    tags = _tags(client, name, 1)
    assert tags["promotion"] == "kept" and tags["val_f1"] == "0.9"
    assert tags["promotion_reason"] == useless.reason
    assert useless.reason == (f"below the quality gate: F1 {ALL_CHANGE_F1:.4f} <= all-change F1 {ALL_CHANGE_F1:.4f} "
                              "+ margin 0.10")
    assert float(tags["challenger_f1"]) == pytest.approx(ALL_CHANGE_F1, abs=1e-6)
    assert float(tags["all_change_f1"]) == pytest.approx(ALL_CHANGE_F1, abs=1e-6)
    assert float(tags["quality_gate"]) == pytest.approx(ALL_CHANGE_F1 + 0.10, abs=1e-6)
    assert "champion_f1" not in tags and "promotion_request" not in tags

    # The margin is the worker's setting: 2/3 passes the default gate (0.32), not one of 0.5 (0.72).
    strict = _register(store, crafted, tmp_path, name, crafted.half, margin=0.5)
    assert not strict.promoted and strict.reason.startswith("below the quality gate: F1 0.6667")
    assert float(_tags(client, name, strict.version)["quality_gate"]) == pytest.approx(ALL_CHANGE_F1 + 0.5, abs=1e-6)

    good = _register(store, crafted, tmp_path, name, crafted.perfect, val_f1=0.1)
    assert (good.version, good.promoted, good.alias, good.stage) == (3, True, "production", "Production")
    assert good.reason.startswith("first production version: F1 1.0000") and "quality gate 0.3222" in good.reason
    assert _aliases(client, name) == {"production": "3", "staging": "3"}
    assert _tags(client, name, 3)["promotion"] == "promoted" and good.previous_production_version is None


def test_a_worse_challenger_scored_on_the_same_data_is_kept_out(store, crafted, tmp_path):
    client, name = store.client, "cd-worse"
    champion = _register(store, crafted, tmp_path, name, crafted.perfect, val_f1=0.40)
    assert champion.promoted
    # Its own val_f1 (another dataset) is far higher than the champion's tag: the old rule would
    # have promoted it. On the same data it is worse.
    worse = _register(store, crafted, tmp_path, name, crafted.half, val_f1=0.95)
    assert (worse.promoted, worse.alias, worse.stage, worse.previous_production_version) == (False, "staging",
                                                                                            "Staging", 1)
    assert worse.reason == ("F1 0.6667 on this job's validation split does not beat production v1's 1.0000 on "
                            "the same data")
    tags = _tags(client, name, worse.version)
    assert tags["promotion"] == "kept"
    assert float(tags["champion_f1"]) == 1.0 and float(tags["challenger_f1"]) == pytest.approx(2 / 3, abs=1e-6)
    assert _version(client, name, "production") == 1
    assert client.get_model_version(name, "1").current_stage == "Production"

    tie = _register(store, crafted, tmp_path, name, crafted.perfect, val_f1=0.99)  # a tie keeps the champion
    assert not tie.promoted and "does not beat production v1's 1.0000" in tie.reason
    assert _version(client, name, "production") == 1


def test_a_better_challenger_is_promoted_and_the_champion_archived(store, crafted, tmp_path):
    client, name = store.client, "cd-better"
    champion = _register(store, crafted, tmp_path, name, crafted.half, val_f1=0.90)
    assert champion.promoted and champion.stage == "Production"
    better = _register(store, crafted, tmp_path, name, crafted.perfect, val_f1=0.30)  # lower tag, better model
    assert (better.version, better.promoted, better.alias, better.stage) == (2, True, "production", "Production")
    assert better.previous_production_version == 1 and better.previous_production_f1 == 0.9
    assert better.reason == "F1 1.0000 on this job's validation split beats production v1's 0.6667 on the same data"
    assert _aliases(client, name) == {"production": "2", "staging": "2"}
    stages = {int(v.version): v.current_stage for v in client.search_model_versions(f"name = '{name}'")}
    assert stages == {1: "Archived", 2: "Production"}
    tags = _tags(client, name, 2)
    assert tags["promotion"] == "promoted" and tags["promoted_over"] == "1" and tags["previous_production_f1"] == "0.9"
    assert float(tags["champion_f1"]) == pytest.approx(2 / 3, abs=1e-6) and float(tags["challenger_f1"]) == 1.0
    assert tags["val_f1"] == "0.3" and "promotion_request" in tags
    mv = client.get_model_version(name, "2")  # the version links back to its run and logged model
    logged_model = client.get_logged_model(mv.tags["logged_model_id"])
    assert logged_model.source_run_id == mv.run_id and mv.source == logged_model.artifact_location


def test_a_champion_without_checkpoint_or_val_f1_is_never_replaced_automatically(store, crafted, tmp_path):
    client, name = store.client, "cd-no-checkpoint"
    # As if registered before runs carried their checkpoint: production, but nothing to score.
    legacy = _register(store, crafted, tmp_path, name, crafted.half, logs_checkpoint=False)
    assert legacy.promoted
    challenger = _register(store, crafted, tmp_path, name, crafted.perfect)
    assert not challenger.promoted and _version(client, name, "production") == 1
    assert challenger.reason == "production v1 has no checkpoint to score on this job's data; promote by hand"
    tags = _tags(client, name, challenger.version)
    assert tags["promotion"] == "kept" and tags["promotion_reason"] == challenger.reason
    assert "champion_f1" not in tags and float(tags["challenger_f1"]) == 1.0

    client.delete_model_version_tag(name, "1", "val_f1")  # as if a person had put v1 there
    hand_placed = _register(store, crafted, tmp_path, name, crafted.perfect)
    assert not hand_placed.promoted and "never replaced automatically" in hand_placed.reason
    assert _version(client, name, "production") == 1
    with pytest.raises(ValueError):
        _register(store, crafted, tmp_path, name, crafted.perfect, val_f1=float("nan"))


def test_the_rightful_production_walks_the_request_tree_first_come_first_served():
    r = PromotionRequest
    # v2 and v3 both beat v1 (v2 asked first); v4 then beat v2: v4 is rightful, from v1, v2, v3 or v4.
    requests = {2: r(100, 1), 3: r(101, 1), 4: r(200, 2)}
    assert {rightful_production(v, requests) for v in (1, 2, 3, 4)} == {4}
    assert rightful_production(None, {5: r(100, None), 6: r(99, None)}) == 6  # first versions: the earliest
    assert rightful_production(7, requests) == 7  # nobody beat v7: it stays (e.g. placed by hand since)
    assert rightful_production(None, {}) is None
    assert rightful_production(2, {2: r(1, 3), 3: r(2, 2)}) in (2, 3)  # stale tags in a cycle: no endless loop


class _RacingClient(MlflowClient):
    """Holds this worker's settle until the other worker has finished: the interleaving where a
    worker that asked first settles last."""

    def __init__(self, uri, asked: threading.Event | None = None, hold_until: threading.Event | None = None):
        super().__init__(uri)
        self.asked, self.hold_until, self.held = asked, hold_until, False

    def set_model_version_tag(self, name, version, key, value):
        super().set_model_version_tag(name, version, key, value)
        if key == "promotion_request" and self.asked is not None:
            self.asked.set()

    def search_model_versions(self, filter_string=None, *args, **kwargs):
        # The settle searches by name (the registration looks up its run's versions by run_id).
        if self.hold_until is not None and not self.held and filter_string.startswith("name ="):
            self.held = True
            assert self.hold_until.wait(30)
        return super().search_model_versions(filter_string, *args, **kwargs)


def _table_judge(f1_on_my_data: dict[int | None, float], mine: float):
    """A judge that knows every model's F1 on its job's data (champion version -> F1)."""
    def judge(champion):
        if champion is None:
            return Verdict(True, "first")
        theirs = f1_on_my_data[champion.version]
        return Verdict(mine > theirs, f"{mine} vs v{champion.version}'s {theirs}", {"champion_f1": repr(theirs)})
    return judge


def test_concurrent_promotions_end_as_if_the_jobs_had_finished_one_after_the_other(store, tmp_path):
    name = "cd-race"
    runs = [_cheap_run(store.client, store.experiment_id, tmp_path) for _ in range(2)]
    asked, first_done = threading.Event(), threading.Event()
    # Worker 1's model is v1 and worker 2's v2 (registered in that order, below).
    first_client = _RacingClient(store.uri, asked=asked, hold_until=first_done)
    results = {}

    def first():
        # On its own data v2 would score 0.9 against its 0.7: it never replaces v2.
        results["first"] = register_and_promote(first_client, runs[0], name, 0.5, settle_s=0.1,
                                                judge=_table_judge({2: 0.9}, 0.7))

    thread = threading.Thread(target=first)
    thread.start()
    assert asked.wait(30)  # worker 1 judged "no production", asked, and now waits to settle
    try:
        # Worker 2 also finds no production and asks, after worker 1: the settle gives worker 1's
        # request the place (first come), so worker 2 then judges v1 on its data, beats it, and wins.
        results["second"] = register_and_promote(MlflowClient(store.uri), runs[1], name, 0.5, settle_s=0.1,
                                                 judge=_table_judge({1: 0.6}, 0.8))
    finally:
        first_done.set()
        thread.join(30)

    first_result, second_result = results["first"], results["second"]
    assert (first_result.version, second_result.version) == (1, 2)
    assert second_result.promoted and second_result.previous_production_version == 1
    assert second_result.reason == "0.8 vs v1's 0.6"
    # Worker 1 settled last, found v2 in production over its v1, and judged v2 on its own data.
    assert not first_result.promoted and first_result.reason == "0.7 vs v2's 0.9"
    assert _version(store.client, name, "production") == 2
    assert store.client.get_model_version(name, "2").current_stage == "Production"
    assert _tags(store.client, name, 2)["promoted_over"] == "1"
    assert "promotion_request" not in _tags(store.client, name, 1)  # withdrawn: it can win no later settle
    assert _tags(store.client, name, 1)["promotion"] == "kept"


@pytest.mark.slow
def test_the_job_tracker_scores_the_champion_from_the_checkpoint_its_run_logged(store, crafted, tmp_path):
    """The worker's path: finish() logs the model and its checkpoint, and the next job scores that
    checkpoint, downloaded from the champion's run, on its own data."""
    tracker = MlflowJobTracker(store.client, "cdtrain-tests")
    name = "cd-tracker"

    def finish(checkpoint: Path, job_name: str):
        folder = tmp_path / job_name
        folder.mkdir()
        best = folder / "best.pt"
        shutil.copyfile(checkpoint, best)
        (folder / "metrics.json").write_text("{}")
        result = TrainResult(status="completed", epochs_run=1, best={"epoch": 1, "f1": 0.5}, history=[], test=None,
                             best_checkpoint=best, last_checkpoint=best, metrics_path=folder / "metrics.json")
        job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/drawn/", register_model=True, model_name=name))
        run_id = tracker.start_run(job, crafted.config, attempt=0)
        registered = tracker.finish(run_id, result, job, crafted.data, crafted.config)
        assert store.client.get_run(run_id).info.status == "FINISHED"
        return run_id, job, registered

    run_id, job, first = finish(crafted.half, "half")
    assert (first.version, first.alias) == ("1", "production")
    assert first.decision.startswith("first production version: F1 0.6667")
    assert CHECKPOINT_ARTIFACT in {a.path for a in store.client.list_artifacts(run_id, "checkpoint")}
    assert _tags(store.client, name, 1)["job_id"] == job.job_id

    _, _, second = finish(crafted.perfect, "perfect")
    assert (second.version, second.alias) == ("2", "production")
    assert second.decision == ("F1 1.0000 on this job's validation split beats production v1's 0.6667 on the same "
                               "data")


# --- MLflow trouble never reaches the trainer ---------------------------------------------------------
def _start_info(tmp_path) -> RunStartInfo:
    return RunStartInfo(config=tiny_config().model_dump(), device="cpu", precision="fp32", compiled=False,
                        parameters=1000, train_pairs=7, val_pairs=7, steps_per_epoch=10, total_steps=20,
                        start_epoch=1, out_dir=tmp_path)


def _step(i: int) -> StepInfo:
    return StepInfo(epoch=1, step_in_epoch=i, steps_per_epoch=10, global_step=i, loss=1.0 / i, lr=1e-3,
                    metrics={"f1": 0.5})


def _epoch(epoch: int) -> EpochInfo:
    metrics = {"f1": 0.5, "iou": 0.3, "precision": 0.5, "recall": 0.5, "accuracy": 0.9, "loss": 0.7}
    return EpochInfo(epoch=epoch, epochs=2, lr=1e-3, train=metrics, val=metrics, is_best=True, best_epoch=epoch,
                     best_f1=0.5, seconds=1.0)


def _result(tmp_path) -> TrainResult:
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}")
    return TrainResult(status="completed", epochs_run=1, best={"epoch": 1, "f1": 0.5}, history=[], test=None,
                       best_checkpoint=tmp_path / "best.pt", last_checkpoint=tmp_path / "last.pt",
                       metrics_path=metrics)


class _BrokenClient:
    def __init__(self):
        self.calls = 0

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        raise MlflowException("tracking server said no")

    def log_artifact(self, *args, **kwargs):
        self.calls += 1
        raise OSError("disk full")

    def get_metric_history(self, *args, **kwargs):
        self.calls += 1
        raise MlflowException("tracking server said no")


class _StuckClient:
    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def log_batch(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(30)

    def log_artifact(self, *args, **kwargs):
        self.release.wait(30)

    def get_metric_history(self, *args, **kwargs):
        return []


def test_mlflow_errors_are_counted_not_raised(tmp_path):
    client = _BrokenClient()
    hooks = MlflowHooks(client, "run-broken", step_flush_every=5)
    hooks.on_run_start(_start_info(tmp_path))
    for i in range(1, 11):
        hooks.on_step_end(_step(i))
    hooks.on_epoch_end(_epoch(1))
    bad = StepInfo(epoch=1, step_in_epoch=1, steps_per_epoch=10, global_step=11, loss=0.1, lr=1e-3,
                   metrics={"f1": "not a number"})
    hooks.on_step_end(bad)  # a bug in the hook itself is caught too
    hooks.on_run_end(_result(tmp_path))  # drains the queue, never raises
    health = hooks.health
    # params+tags, the read of what earlier attempts logged, 2 step batches, 1 epoch batch, final
    # metrics, 2 artifacts; plus the bad step
    assert client.calls == 8 and health.errors == 9
    assert not health.ok and health.pending == 0
    assert any("tracking server said no" in e for e in health.last_errors)
    assert any("disk full" in e for e in health.last_errors)


def test_a_stuck_tracking_server_never_blocks_steps_and_drops_only_step_metrics(tmp_path):
    client = _StuckClient()
    hooks = MlflowHooks(client, "run-stuck", step_flush_every=1, max_step_backlog=2, final_flush_timeout_s=0.3)
    hooks.on_run_start(_start_info(tmp_path))  # the first call: the sender hangs in it
    assert client.entered.wait(10)
    started = time.monotonic()
    for i in range(1, 11):
        hooks.on_step_end(_step(i))
    hooks.on_epoch_end(_epoch(1))
    assert time.monotonic() - started < 0.5  # the training thread never waited for MLflow
    health = hooks.health
    # 2 step batches queue (the backlog), the other 8 are dropped: 3 values each.
    assert health.dropped_step_metrics == 8 * 3
    started = time.monotonic()
    hooks.on_run_end(_result(tmp_path))
    assert time.monotonic() - started < 5
    health = hooks.health
    # In flight + the read of earlier attempts' metrics + 2 step batches + epoch metrics + final
    # metrics + 2 artifacts were left unsent.
    assert health.pending == 8 and not health.ok
    client.release.set()


# --- the REST path: a real `mlflow server` -----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log_path = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--default-artifact-root", (root / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = started + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health within 90 s:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.2)
        startup_s = time.monotonic() - started
        print(f"\nmlflow import {MLFLOW_IMPORT_S:.1f} s; mlflow server ready in {startup_s:.1f} s")
        yield SimpleNamespace(url=url, startup_s=startup_s, log=log_path)
    finally:
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with _suppress_lookup():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, ProcessLookupError)


@pytest.mark.slow
def test_rest_server_end_to_end(mlflow_server, trained, levir_samples, tmp_path, record_property):  # noqa: F811
    client = MlflowClient(mlflow_server.url)
    record_property("mlflow_server_startup_s", round(mlflow_server.startup_s, 1))
    run_id, created = start_job_run(client, "cdtrain-rest", job_id="job-rest", dataset_uri="s3://b/levir",
                                    source="bucket")
    assert created
    hooks = MlflowHooks(client, run_id, step_flush_every=3)
    hooks.on_run_start(_start_info(tmp_path))
    for i in range(1, 11):
        hooks.on_step_end(_step(i))
    hooks.on_epoch_end(_epoch(1))
    hooks.on_run_end(_result(tmp_path))
    assert hooks.health.ok, hooks.health
    run = client.get_run(run_id)
    assert run.data.params == config_params(tiny_config().model_dump())
    assert [m.step for m in client.get_metric_history(run_id, "step_loss")] == list(range(1, 11))
    assert [m.step for m in client.get_metric_history(run_id, "val_f1")] == [1]
    assert {METRICS_ARTIFACT, CONFIG_ARTIFACT} <= {a.path for a in client.list_artifacts(run_id)}

    started = time.monotonic()
    info = log_best_model(client, run_id, trained.result.best_checkpoint)
    log_model_s = time.monotonic() - started
    record_property("log_best_model_rest_s", round(log_model_s, 1))
    # Two epochs on seven tiles score little: the gate is lowered (a negative margin) so the REST
    # path of a promotion and of a champion's checkpoint download are what is tested here.
    score = validation_scorer(levir_samples, trained.config)

    def judge(challenger_run: str) -> PromotionJudge:
        return PromotionJudge(client, trained.result.best_checkpoint, score, margin=-1.0,
                              work_dir=tmp_path / f"champions-{challenger_run}")

    first = register_and_promote(client, run_id, "cd-rest", info.val_f1, judge=judge(run_id), settle_s=0.2)
    assert first.promoted and first.stage == "Production", first.reason
    # A later attempt of the job finds the run's version over REST (a run_id search) and its decision.
    assert register_and_promote(client, run_id, "cd-rest", info.val_f1, judge=judge(run_id)) == first

    # The same weights again: the champion is downloaded over REST and scored; a tie keeps it.
    other_run = _cheap_run(client, client.get_run(run_id).info.experiment_id, tmp_path)
    second = register_and_promote(client, other_run, "cd-rest", info.val_f1 + 0.01, judge=judge(other_run),
                                  settle_s=0.2)
    assert not second.promoted and second.stage == "Staging" and second.previous_production_version == first.version
    assert "does not beat production v1's" in second.reason
    champion_tags = client.get_model_version("cd-rest", str(second.version)).tags
    assert champion_tags["champion_f1"] == champion_tags["challenger_f1"]
    assert int(client.get_model_version_by_alias("cd-rest", "production").version) == first.version
    client.set_terminated(run_id, mlflow_run_status(trained.result.status))
    assert client.get_run(run_id).info.status == "FINISHED"

    tiles = _tiles(levir_samples, 1)
    with _use_tracking_uri(mlflow_server.url):
        loaded = mlflow.pyfunc.load_model("models:/cd-rest@production")
    got = loaded.predict(_raw_input(tiles, 5, 9, 48, 80))
    want = _checkpoint_probabilities(trained.result.best_checkpoint, tiles, 5, 9, 48, 80)
    assert got.shape == (1, 1, 48, 80)
    np.testing.assert_allclose(got, want, atol=1e-5)
    print(f"\nlog_best_model over REST {log_model_s:.1f} s (server start {mlflow_server.startup_s:.1f} s)")
