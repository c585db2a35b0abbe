#!/bin/sh
# One-shot MinIO setup for deploy/compose.yaml (runs in the minio/mc image, after MinIO and the
# ingress are healthy). Idempotent: safe on every `docker compose up`.
#
# - bucket `datasets`: drop a dataset under datasets/<name>/ (a .zip/.tar.gz, or files plus a
#   _READY marker) and the ingress starts a training job;
# - bucket `mlflow`: the MLflow server's artifact store (--artifacts-destination s3://mlflow);
# - bucket `checkpoints`: the workers' job checkpoints (CDTRAIN_CHECKPOINT_URI), so any worker resumes a job;
# - the bucket notification: object-created events under datasets/ go to the webhook target
#   `cdtrain` that the minio service defines (MINIO_NOTIFY_WEBHOOK_*_cdtrain), i.e. to
#   http://ingress:8080/events/s3 with the webhook bearer token.
set -eu

ARN="arn:minio:sqs::cdtrain:webhook"

mc alias set local "http://minio:9000" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing local/datasets local/mlflow local/checkpoints

if mc event ls local/datasets "$ARN" | grep -q "$ARN"; then
  echo "bucket notification datasets -> $ARN already configured"
else
  mc event add local/datasets "$ARN" --event put --prefix datasets/
fi
mc event ls local/datasets
