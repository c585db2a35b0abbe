"""The worker's run logging: :mod:`snunet_cbam.mlflow_run`, which ``cdtrain train --mlflow`` uses
too (it lives beside the trainer so that the command line needs nothing of the service)."""

from snunet_cbam.mlflow_run import (CONFIG_ARTIFACT, CURVES_DIR, EPOCH_SERIES, METRICS_ARTIFACT, PANELS_DIR,
                                    STEP_SERIES, MlflowHooks, TrackingHealth, config_params, curve_artifacts,
                                    panel_artifact, yaml_scalar)

__all__ = ["CONFIG_ARTIFACT", "CURVES_DIR", "EPOCH_SERIES", "METRICS_ARTIFACT", "PANELS_DIR", "STEP_SERIES",
           "MlflowHooks", "TrackingHealth", "config_params", "curve_artifacts", "panel_artifact", "yaml_scalar"]
