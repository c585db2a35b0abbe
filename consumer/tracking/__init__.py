"""MLflow for the training worker: run logging hooks, the logged model, the registry policy.

Everything takes an ``mlflow.MlflowClient`` built by the caller; nothing here reads the tracking
URI from the environment or uses MLflow's fluent (global) API. See ``docs/mlflow.md``.
"""

from snunet_cbam.mlflow_run import (CHECKPOINT_ARTIFACT, CONFIG_ARTIFACT, CURVES_DIR, METRICS_ARTIFACT, PANELS_DIR,
                                    DatasetLineage, MlflowHooks, TrackingHealth, config_params, curve_artifacts,
                                    local_dataset_lineage, log_checkpoint, log_dataset_input, panel_artifact,
                                    yaml_scalar)

from .model import ChangeDetectionModule, LoggedModelInfo, default_input_example, log_best_model
from .promotion import (DEFAULT_PROMOTION_MARGIN, PromotionJudge, SplitScore, all_change_f1, fetch_checkpoint,
                        validation_scorer)
from .registry import (PRODUCTION, STAGING, Champion, RegistrationResult, Verdict, find_logged_model,
                       register_and_promote)
from .runs import ensure_experiment, mlflow_run_status, start_job_run

__all__ = [
    "CHECKPOINT_ARTIFACT", "CONFIG_ARTIFACT", "CURVES_DIR", "Champion", "ChangeDetectionModule",
    "DEFAULT_PROMOTION_MARGIN", "DatasetLineage", "LoggedModelInfo", "METRICS_ARTIFACT", "MlflowHooks",
    "PANELS_DIR", "PRODUCTION", "PromotionJudge", "RegistrationResult", "STAGING", "SplitScore",
    "TrackingHealth", "Verdict", "all_change_f1", "config_params", "curve_artifacts", "default_input_example",
    "ensure_experiment", "fetch_checkpoint", "find_logged_model", "local_dataset_lineage", "log_best_model",
    "log_checkpoint", "log_dataset_input", "mlflow_run_status", "panel_artifact", "register_and_promote",
    "start_job_run", "validation_scorer", "yaml_scalar",
]
