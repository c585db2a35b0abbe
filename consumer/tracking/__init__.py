"""MLflow for the training worker: run logging hooks, the logged model, the registry policy.

Everything takes an ``mlflow.MlflowClient`` built by the caller; nothing here reads the tracking
URI from the environment or uses MLflow's fluent (global) API. See ``docs/mlflow.md``.
"""

from .hooks import CONFIG_ARTIFACT, METRICS_ARTIFACT, MlflowHooks, TrackingHealth, config_params, yaml_scalar
from .model import (CHECKPOINT_ARTIFACT, ChangeDetectionModule, LoggedModelInfo, default_input_example,
                    log_best_model, log_checkpoint)
from .promotion import (DEFAULT_PROMOTION_MARGIN, PromotionJudge, SplitScore, all_change_f1, fetch_checkpoint,
                        validation_scorer)
from .registry import (PRODUCTION, STAGING, Champion, RegistrationResult, Verdict, find_logged_model,
                       register_and_promote)
from .runs import ensure_experiment, mlflow_run_status, start_job_run

__all__ = [
    "CHECKPOINT_ARTIFACT", "CONFIG_ARTIFACT", "DEFAULT_PROMOTION_MARGIN", "METRICS_ARTIFACT", "PRODUCTION", "STAGING",
    "ChangeDetectionModule", "Champion", "LoggedModelInfo", "MlflowHooks", "PromotionJudge", "RegistrationResult",
    "SplitScore", "TrackingHealth", "Verdict", "all_change_f1", "config_params", "default_input_example",
    "ensure_experiment", "fetch_checkpoint", "find_logged_model", "log_best_model", "log_checkpoint",
    "mlflow_run_status", "register_and_promote", "start_job_run", "validation_scorer", "yaml_scalar",
]
