"""Pictures and artifacts of a run in a real MLflow store (SQLite, file artifacts): the per-epoch
validation panels, the final precision-recall curves and confusion matrices, the best checkpoint,
the dataset as the run's input; the worker's run and ``cdtrain train --mlflow`` log the same."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from cdtrain.cli import main as cdtrain_main
from consumer.dataset_fetch import FetchedDataset
from consumer.tracking import (CHECKPOINT_ARTIFACT, config_params, curve_artifacts, local_dataset_lineage,
                               panel_artifact)
from consumer.tracking.job_tracker import MlflowJobTracker
from schemas import TrainJob, TrainRequest
from snunet_cbam.data.check import check_pairs
from snunet_cbam.data.layouts import list_split
from snunet_cbam.hooks import TrainerHooks
from snunet_cbam.mlflow_run import LOCAL_RUN_TAG
from snunet_cbam.panels import ValidationPanel, panel_indices, render_panel
from snunet_cbam.synthetic import make_synthetic_dataset
from snunet_cbam.trainer import Trainer
from tests.ml.conftest import tiny_config

EPOCHS = 2
PANEL_TILES = 3  # every validation image of the drawn dataset: the panels then hold the whole split
# Tiny and whole-image: 64 px tiles, one window; a test split so that test curves are logged too.
SETTINGS = dict(epochs=EPOCHS, train_split="train", val_split="val", test_split="test", crop_size=32,
                crops_per_image=1, window_size=None, window_overlap=0, panel_tiles=PANEL_TILES, tta="none")
ETAG_KEY = "5f2b" * 16  # a FetchedDataset's key: 64 hex digits, as consumer/dataset_fetch.py makes them


class _PanelRecorder(TrainerHooks):
    def __init__(self) -> None:
        self.panels: list[ValidationPanel] = []

    def on_validation_panel(self, panel: ValidationPanel) -> None:
        self.panels.append(panel)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 12 pairs: 6 train, 3 val, 3 test.
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), pairs=12, size=64, seed=2,
                                  split_fractions=(0.5, 0.25, 0.25)).root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    tracker = MlflowJobTracker(client, "pictures", artifact_location=(root / "artifacts").as_uri())
    return SimpleNamespace(root=root, client=client, tracker=tracker)


@pytest.fixture(scope="module")
def worker_run(store, data, tmp_path_factory):
    """A run as the worker makes it: the tracker's run and hooks, then its finish (model and checkpoint)."""
    config = tiny_config(**SETTINGS)
    job = TrainJob(request=TrainRequest(dataset_uri="s3://lake/drawn/", register_model=False))
    fetched = FetchedDataset(path=data, etag_key=ETAG_KEY, files=37, bytes=123_456, from_cache=False)
    run_id = store.tracker.start_run(job, config, attempt=1, dataset=fetched)
    recorder = _PanelRecorder()
    result = Trainer(config, data, tmp_path_factory.mktemp("out"), hooks=[store.tracker.hooks(run_id), recorder]).fit()
    store.tracker.finish(run_id, result, job, data, config)
    return SimpleNamespace(run_id=run_id, config=config, result=result, panels=recorder.panels, job=job,
                           fetched=fetched)


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    names = set()
    for item in client.list_artifacts(run_id, path):
        names |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return names


def _metric(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst)))


@pytest.mark.slow
def test_every_epoch_logs_a_panel_of_the_same_tiles_as_they_were_scored(store, worker_run, data, tmp_path):
    client, run_id = store.client, worker_run.run_id
    names = _artifacts(client, run_id)
    assert {panel_artifact(e) for e in range(1, EPOCHS + 1)} <= names
    assert panel_artifact(1) == "panels/epoch_001.png"

    val_names = [p.name for p in check_pairs(list_split(data, "val"), "val").valid]
    assert len(val_names) == PANEL_TILES
    assert [p.epoch for p in worker_run.panels] == list(range(1, EPOCHS + 1))
    for panel in worker_run.panels:
        # The same tiles every epoch, in the split's order; the threshold validation scored with.
        assert [t.name for t in panel.tiles] == [val_names[i] for i in panel_indices(len(val_names), PANEL_TILES)]
        assert panel.threshold == worker_run.config.threshold
        # The panel holds the whole split here, so its outcomes are the epoch's validation counts:
        # the pictures come from the pass that computed the metrics, not from a second prediction.
        tp, fp, fn, tn = np.sum([t.counts() for t in panel.tiles], axis=0).tolist()
        for key, value in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn)):
            assert _metric(client, run_id, f"val_{key}")[panel.epoch] == value, key
        # The artifact is that panel, pixel for pixel.
        logged = Image.open(_download(client, run_id, panel_artifact(panel.epoch), tmp_path / str(panel.epoch)))
        title = f"epoch {panel.epoch}: validation at threshold {panel.threshold:.3f}"
        assert np.array_equal(np.asarray(logged.convert("RGB")), np.asarray(render_panel(panel.tiles, title=title)))


@pytest.mark.slow
def test_final_curves_use_the_runs_threshold_and_counts(store, worker_run, tmp_path):
    client, run_id, result = store.client, worker_run.run_id, worker_run.result
    names = _artifacts(client, run_id)
    assert set(curve_artifacts("val")) | set(curve_artifacts("test")) <= names
    for path in (*curve_artifacts("val"), *curve_artifacts("test")):
        if path.endswith(".png"):
            assert Image.open(_download(client, run_id, path, tmp_path)).format == "PNG"
    best_epoch = int(result.best["epoch"])
    threshold = _metric(client, run_id, "threshold")[best_epoch]
    assert threshold == pytest.approx(result.threshold)

    def document(path: str) -> dict:
        return json.loads(_download(client, run_id, path, tmp_path).read_text())

    val_pr, val_confusion = document("curves/val_pr_curve.json"), document("curves/val_confusion_matrix.json")
    # The chosen threshold is the run's, and its point on the curve is the tuned validation score.
    assert val_pr["threshold"] == val_pr["chosen"]["threshold"] == pytest.approx(threshold)
    assert val_pr["chosen"]["f1"] == pytest.approx(_metric(client, run_id, "tuned_val_f1")[best_epoch])
    assert val_confusion["threshold"] == pytest.approx(threshold)
    assert val_confusion["f1"] == pytest.approx(result.val_at_threshold["f1"])
    # Counts: rows truth (no change, change), columns prediction; every validation pixel once.
    (tn, fp), (fn, tp) = val_confusion["counts"]
    assert tp + fp + fn + tn == 3 * 64 * 64
    assert sum(val_pr["pixels"].values()) == 3 * 64 * 64
    assert [sum(row) for row in val_confusion["normalized"]] == pytest.approx([1.0, 1.0])

    test_pr, test_confusion = document("curves/test_pr_curve.json"), document("curves/test_confusion_matrix.json")
    assert test_pr["threshold"] == pytest.approx(threshold)
    (tn, fp), (fn, tp) = test_confusion["counts"]
    for key, value in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn)):
        assert _metric(client, run_id, f"test_{key}")[best_epoch] == value, key


@pytest.mark.slow
def test_worker_run_holds_the_best_checkpoint_and_the_datasets_digest(store, worker_run):
    client, run_id = store.client, worker_run.run_id
    assert CHECKPOINT_ARTIFACT in _artifacts(client, run_id)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.digest == ETAG_KEY[:36]  # MLflow keeps 36 characters of a digest
    assert json.loads(dataset.source) == {"uri": "s3://lake/drawn/"} and dataset.source_type == "s3"
    assert json.loads(dataset.profile) == {"key": ETAG_KEY, "files": 37, "bytes": 123_456}
    assert {(t.key, t.value) for t in inputs[0].tags} == {("mlflow.data.context", "training")}
    # A later attempt of the job on the same content finds the run again and adds no second input.
    again = store.tracker.start_run(worker_run.job, worker_run.config, attempt=2, dataset=worker_run.fetched)
    assert again == run_id
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 1
    client.set_terminated(run_id, "FINISHED")


def test_local_dataset_digest_follows_names_sizes_and_times(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", pairs=3, size=32, seed=0).root
    first = local_dataset_lineage(root)
    assert local_dataset_lineage(root) == first
    assert first.source == root.resolve().as_uri() and first.files == 3 * 3 + 3 and len(first.digest) == 36
    label = next((root / "label").iterdir())
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: content may differ
    touched = local_dataset_lineage(root)
    assert touched.key != first.key and (touched.files, touched.bytes) == (first.files, first.bytes)
    label.rename(label.with_name("renamed.png"))
    assert local_dataset_lineage(root).key not in (first.key, touched.key)


@pytest.mark.slow
def test_cdtrain_train_mlflow_logs_the_same_run_as_the_worker(store, worker_run, data, tmp_path, capsys,
                                                            monkeypatch):
    # A new experiment in a SQLite store keeps its artifacts in ./mlruns: here, not in the checkout.
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'local.db'}"
    out = tmp_path / "run"
    overrides = [f"{k}={'null' if v is None else v}" for k, v in SETTINGS.items()]
    tiny = tiny_config(**SETTINGS).model_dump()
    overrides += [f"{k}={json.dumps(tiny[k])}" for k in ("base_channel", "batch_size", "num_workers", "compile", "amp",
                                                         "device", "patience")]
    started = time.monotonic()
    code = cdtrain_main(["train", "--data", str(data), "--out", str(out), "--mlflow", uri, "--quiet",
                         *[a for o in overrides for a in ("--set", o)]])
    assert code == 0, capsys.readouterr().err
    assert time.monotonic() - started < 300

    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags[LOCAL_RUN_TAG] == str(out.resolve())
    # The same artifacts as the worker's run: panels, curves, checkpoint, metrics, config.
    assert _artifacts(client, run.info.run_id) == _artifacts(store.client, worker_run.run_id)
    config = tiny_config(**SETTINGS)
    assert run.data.params == config_params(config.model_dump())
    assert sorted(_metric(client, run.info.run_id, "val_f1")) == list(range(1, EPOCHS + 1))
    [input_] = run.inputs.dataset_inputs
    lineage = local_dataset_lineage(data)
    assert input_.dataset.digest == lineage.digest and json.loads(input_.dataset.source) == {"uri": lineage.source}
    assert input_.dataset.source_type == "local"
