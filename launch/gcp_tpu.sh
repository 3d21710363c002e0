#!/usr/bin/env bash
# Train a pafm_jax config on a Cloud TPU VM slice (every host runs the same command).
#
#   launch/gcp_tpu.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [--config.x=y ...]
#   launch/gcp_tpu.sh sit-xl2 us-central2-b v4-64 configs/sit_xl2.py gs://BUCKET/sit_xl2
#
# Creates the TPU VM if it does not exist (set TPU_VERSION to override the runtime image),
# copies this checkout to every host, installs requirements plus jax[tpu], and starts
# `python -m pafm_jax.main --distributed` on all workers. WORKDIR should be a gs:// path (or a
# disk every host sees): checkpoints are written by all hosts together, and a restarted
# command resumes from the latest complete checkpoint by itself.
#
# Retrieval (config.retrieval.mode != none): each host reads the index from its own disk. Build
# it once (--mode=build_index), copy the directory to a bucket, and set INDEX_URI=gs://...: it
# is copied to ~/pafm_index on every host and passed as config.retrieval.index_dir. Without
# INDEX_URI every host builds its own copy on first start.
set -euo pipefail

if [ $# -lt 5 ]; then
  sed -n '2,16p' "$0"; exit 2
fi
NAME=$1 ZONE=$2 ACCEL=$3 CONFIG=$4 WORKDIR=$5
shift 5
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)

command -v gcloud >/dev/null || { echo "gcloud is not installed: see cloud.google.com/sdk"; exit 1; }
[ -f "$REPO_DIR/$CONFIG" ] || { echo "no config $CONFIG in $REPO_DIR"; exit 1; }

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" \
    --accelerator-type="$ACCEL" --version="$TPU_VERSION"
fi

TARBALL=$(mktemp --suffix=.tar.gz)
git -C "$REPO_DIR" archive --format=tar.gz -o "$TARBALL" HEAD
gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME":pafm_jax.tar.gz --zone="$ZONE" --worker=all
rm -f "$TARBALL"

SETUP='set -e; rm -rf pafm_jax && mkdir pafm_jax && tar xzf pafm_jax.tar.gz -C pafm_jax && cd pafm_jax &&
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt &&
  .venv/bin/pip install -q --no-deps -r requirements-nodeps.txt &&
  .venv/bin/pip install -q "jax[tpu]==$(.venv/bin/python -c "import jax; print(jax.__version__)")"'
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$SETUP"

INDEX_ARGS=""
if [ -n "${INDEX_URI:-}" ]; then
  gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all \
    --command="rm -rf ~/pafm_index ~/pafm_index_tmp && gsutil -m -q cp -r '${INDEX_URI%/}' ~/pafm_index_tmp && mv ~/pafm_index_tmp ~/pafm_index"
  INDEX_ARGS="--config.retrieval.index_dir=\$HOME/pafm_index"
fi

RUN="cd pafm_jax && .venv/bin/python -m pafm_jax.main --distributed --config=$CONFIG --workdir=$WORKDIR $INDEX_ARGS $*"
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$RUN"
