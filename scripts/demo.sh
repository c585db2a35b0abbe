#!/usr/bin/env bash
# make demo: the whole service on one machine, driven the way a user drives it.
#  1. starts `cdtrain serve` on the embedded parts (state under .cdtrain/demo/)
#  2. makes a small synthetic change dataset
#  3. drops it into the bucket as an archive, with a train_config.yaml beside it (trigger path)
#  4. submits the same dataset over REST, registering the model
#  5. follows both jobs live, then prints a summary of each
#  6. makes a change map with the registered model (cdtrain predict)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DEMO=.cdtrain/demo
BUCKET=demo
PORT=${CDTRAIN_PORT:-$($BIN/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export CDTRAIN_URL="http://127.0.0.1:${PORT}"

rm -rf "$DEMO"
mkdir -p "$DEMO"
echo "== starting the service on ${CDTRAIN_URL} (log: ${DEMO}/serve.log)"
CDTRAIN_DATA_DIR="$DEMO/data" CDTRAIN_PORT="$PORT" CDTRAIN_HEARTBEAT_S=5 "$BIN/cdtrain" serve >"$DEMO/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
ready() { "$BIN/python" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=2).read().decode())' "$CDTRAIN_URL"; }
for _ in $(seq 1 120); do
  if ready >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then echo "the service did not start:"; tail -20 "$DEMO/serve.log"; exit 1; fi
  sleep 0.5
done
ready

echo "== making a synthetic dataset"
"$BIN/cdtrain" make-dataset --out "$DEMO/synthetic" --pairs 40 --size 128 --seed 0

# A small CPU recipe: the defaults are the GPU recipe (base_channel 32, 100 epochs).
cat >"$DEMO/train_config.yaml" <<'YAML'
epochs: 6
base_channel: 8
crop_size: 64
batch_size: 8
lr: 0.003
num_workers: 0
window_size: 128
window_overlap: 0
rotate_prob: 0.2
YAML

echo "== dropping the dataset into the bucket: s3://${BUCKET}/datasets/scene-1/scene.zip"
DROP="$DEMO/data/objects/$BUCKET/datasets/scene-1"
mkdir -p "$DROP"
cp "$DEMO/train_config.yaml" "$DROP/train_config.yaml"
(cd "$DEMO/synthetic" && "$OLDPWD/$BIN/python" -m zipfile -c "$OLDPWD/$DEMO/scene.zip" A B label list)
mv "$DEMO/scene.zip" "$DROP/scene.zip"

echo "== waiting for the bucket event to start a job"
BUCKET_JOB=""
for _ in $(seq 1 60); do
  BUCKET_JOB=$("$BIN/cdtrain" list --json | "$BIN/python" -c '
import json, sys
jobs = json.load(sys.stdin)["jobs"]
print(next((j["job_id"] for j in jobs if (j.get("trigger") or {}).get("key") == "datasets/scene-1/scene.zip"), ""))')
  [ -n "$BUCKET_JOB" ] && break
  sleep 0.5
done
[ -n "$BUCKET_JOB" ] || { echo "no job was started by the bucket event"; tail -20 "$DEMO/serve.log"; exit 1; }
echo "bucket job: $BUCKET_JOB"

echo "== submitting the same dataset over REST"
REST_JOB=$("$BIN/cdtrain" submit "s3://${BUCKET}/datasets/scene-1/scene.zip" \
  --config "s3://${BUCKET}/datasets/scene-1/train_config.yaml" --set epochs=8 --register --model-name demo-cd)
echo "REST job: $REST_JOB"

echo "== following the bucket job live"
"$BIN/cdtrain" watch "$BUCKET_JOB" || true
echo "== following the REST job live"
"$BIN/cdtrain" watch "$REST_JOB" || true

echo "== summary"
STATUS=0
for job in "$BUCKET_JOB" "$REST_JOB"; do
  echo "--- $job"
  "$BIN/cdtrain" status "$job"
  state=$("$BIN/cdtrain" status "$job" --json | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  [ "$state" = "succeeded" ] || STATUS=1
done
"$BIN/cdtrain" list

# The model the REST job registered, from the registry to a change map of a test pair (what a user
# does with a GeoTIFF scene; these tiles are PNG, so the outputs carry no CRS).
ALIAS=$("$BIN/cdtrain" status "$REST_JOB" --json | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin).get("model_alias") or "")')
PAIR=$(head -1 "$DEMO/synthetic/list/test.txt")
if [ -n "$ALIAS" ]; then
  echo "== a change map from models:/demo-cd@${ALIAS} (test pair ${PAIR}): ${DEMO}/maps/"
  MLFLOW_TRACKING_URI="sqlite:///$PWD/$DEMO/data/mlflow.db" "$BIN/cdtrain" predict --model "models:/demo-cd@${ALIAS}" \
    --before "$DEMO/synthetic/A/$PAIR" --after "$DEMO/synthetic/B/$PAIR" --out "$DEMO/maps/${PAIR%.*}" || STATUS=1
fi
echo "MLflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/$DEMO/data/mlflow.db"
exit $STATUS
