"""One MLflow run per training job: created (or found again) by the worker, ended by it."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from snunet_cbam.hooks import RunStatus as TrainStatus

JOB_ID_TAG = "job_id"
FAILURE_TAG = "failure_reason"


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it if missing (safe when two workers race to create it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def start_job_run(client: MlflowClient, experiment: str, *, job_id: str, dataset_uri: str, source: str,
                  run_name: str | None = None, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """``(run_id, created)``: the run tagged ``job_id`` in ``experiment``, created if there is none.

    A redelivered job (worker crash, resume) finds its run again instead of starting a second one.
    """
    experiment_id = ensure_experiment(client, experiment)
    escaped = job_id.replace("\\", "\\\\").replace("'", "\\'")
    found = client.search_runs([experiment_id], filter_string=f"tags.{JOB_ID_TAG} = '{escaped}'",
                               max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        run = found[0]
        if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
            client.update_run(run.info.run_id, status="RUNNING")
            # The earlier attempt's stop ("cancelled" when its worker shut down) no longer holds.
            if FAILURE_TAG in run.data.tags:
                client.delete_tag(run.info.run_id, FAILURE_TAG)
        return run.info.run_id, False
    run = client.create_run(experiment_id, run_name=run_name or f"job-{job_id}", tags={
        JOB_ID_TAG: job_id, "dataset_uri": dataset_uri, "source": source, **(tags or {}),
    })
    return run.info.run_id, True


def mlflow_run_status(status: TrainStatus | None) -> str:
    """The MLflow run status for a training outcome (``None``: training raised)."""
    return {"completed": "FINISHED", "early_stopped": "FINISHED", "time_limit": "FINISHED",
            "cancelled": "KILLED"}.get(status or "", "FAILED")
