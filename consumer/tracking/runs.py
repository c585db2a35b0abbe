"""One MLflow run per training job: created (or found again) by the worker, ended by it."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from snunet_cbam.mlflow_run import ensure_experiment, mlflow_run_status

__all__ = ["FAILURE_TAG", "JOB_ID_TAG", "ensure_experiment", "mlflow_run_status", "start_job_run"]

JOB_ID_TAG = "job_id"
FAILURE_TAG = "failure_reason"


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
