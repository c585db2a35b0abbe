"""MLflow for the training worker: run logging hooks, the logged model, the registry policy.

Everything takes an ``mlflow.MlflowClient`` built by the caller; nothing here reads the tracking
URI from the environment or uses MLflow's fluent (global) API. See ``docs/mlflow.md``.
"""

from .hooks import CONFIG_ARTIFACT, METRICS_ARTIFACT, MlflowHooks, TrackingHealth, config_params, yaml_scalar
from .model import ChangeDetectionModule, LoggedModelInfo, default_input_example, log_best_model
from .registry import PRODUCTION, STAGING, RegistrationResult, find_logged_model, register_and_promote
from .runs import ensure_experiment, mlflow_run_status, start_job_run

__all__ = [
    "CONFIG_ARTIFACT", "METRICS_ARTIFACT", "PRODUCTION", "STAGING", "ChangeDetectionModule", "LoggedModelInfo",
    "MlflowHooks", "RegistrationResult", "TrackingHealth", "config_params", "default_input_example",
    "ensure_experiment", "find_logged_model", "log_best_model", "mlflow_run_status", "register_and_promote",
    "start_job_run", "yaml_scalar",
]
