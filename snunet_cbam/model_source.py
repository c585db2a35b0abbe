"""Where a model to predict with comes from: a trainer checkpoint on disk, or the MLflow registry.

A registered model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/MODEL_ID``) or a
run (``runs:/RUN_ID[/PATH]``) is resolved to its training run, and the checkpoint that run logged
as ``checkpoint/best.pt`` is downloaded. The checkpoint, not the exported pyfunc model, is what
prediction uses: it carries the config (bands, scaling, normalisation, windows, flips) and the
tuned decision threshold, and it predicts exactly as evaluation scores.

MLflow is imported only here and only for such a URI: a checkpoint needs no MLflow at all.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

# The run artifact a logged model's checkpoint is stored as (mlflow_run.log_checkpoint logs it there).
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/best.pt"

_VERSION = re.compile(r"^\d+$")


class ModelSourceError(ValueError):
    """A model URI that does not resolve to a checkpoint; the message says which part failed."""


def _client(tracking_uri: str | None):
    try:
        from mlflow import MlflowClient
    except ImportError:  # pragma: no cover - mlflow is a service dependency
        raise ModelSourceError("a models:/ or runs:/ URI needs MLflow (pip install mlflow)") from None
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def run_of(uri: str, client) -> tuple[str, str]:
    """``(run_id, artifact path of the checkpoint)`` of a ``models:/`` or ``runs:/`` URI."""
    from mlflow.exceptions import MlflowException

    try:
        if uri.startswith("runs:/"):
            rest = uri[len("runs:/"):].strip("/")
            run_id, _, path = rest.partition("/")
            if not run_id:
                raise ModelSourceError(f"{uri}: expected runs:/RUN_ID or runs:/RUN_ID/PATH/TO/CHECKPOINT.pt")
            client.get_run(run_id)  # a clear "run not found" before any download
            return run_id, path if path.endswith(".pt") else CHECKPOINT_ARTIFACT
        if not uri.startswith("models:/"):
            raise ModelSourceError(f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION, models:/MODEL_ID "
                                   "or runs:/RUN_ID")
        rest = uri[len("models:/"):].strip("/")
        if "@" in rest:
            name, _, alias = rest.partition("@")
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in rest:
            name, _, number = rest.partition("/")
            if not _VERSION.match(number):
                raise ModelSourceError(f"{uri}: give a version number or an alias (models:/{name}@production); "
                                       "registry stages are deprecated in favour of aliases")
            version = client.get_model_version(name, number)
        else:
            logged = client.get_logged_model(rest)
            if not logged.source_run_id:
                raise ModelSourceError(f"{uri}: the logged model has no source run, so no checkpoint")
            return logged.source_run_id, CHECKPOINT_ARTIFACT
        if not version.run_id:
            raise ModelSourceError(f"{uri}: version {version.version} of '{version.name}' has no run, so no "
                                   "checkpoint")
        return version.run_id, CHECKPOINT_ARTIFACT
    except MlflowException as exc:
        raise ModelSourceError(f"{uri}: {exc.message}") from None


def fetch_checkpoint(uri: str, dst_dir: Path | str | None = None, *, tracking_uri: str | None = None) -> Path:
    """Download the checkpoint behind ``uri`` into ``dst_dir`` (a new temporary directory if None)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    run_id, artifact = run_of(uri, client)
    folder, _, _ = artifact.rpartition("/")
    try:
        listed = {a.path for a in client.list_artifacts(run_id, folder or None)}
    except MlflowException as exc:
        raise ModelSourceError(f"{uri}: cannot list the artifacts of run {run_id}: {exc.message}") from None
    if artifact not in listed:
        raise ModelSourceError(f"{uri}: run {run_id} has no {artifact} (the trainer checkpoint prediction needs)")
    dst = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="cdtrain-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact, str(dst)))


def resolve_checkpoint(*, model: str | None = None, checkpoint: Path | str | None = None,
                       tracking_uri: str | None = None, dst_dir: Path | str | None = None) -> Path:
    """The local checkpoint of exactly one of ``model`` (a URI) and ``checkpoint`` (a path)."""
    if (model is None) == (checkpoint is None):
        raise ModelSourceError("give exactly one of a model URI (models:/NAME@ALIAS, runs:/ID) and a checkpoint path")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    return fetch_checkpoint(str(model), dst_dir, tracking_uri=tracking_uri)
