#!/usr/bin/env bash
# Train pafm_jax on a Cloud TPU slice: create it, set up every worker, train, watch, fetch,
# tear down. Every worker runs the same command; the job resumes by itself when restarted.
#
#   launch/gcp_tpu.sh [--dry-run] STEP NAME --zone=ZONE [options] [-- pafm_jax.main flags]
#
#   create   --type=v4-64 [--runtime=tpu-ubuntu2204-base] [--queued] [--spot]
#            a TPU VM, or a queued resource (--queued) that waits for capacity
#   setup    [--index=gs://BUCKET/index]   copy this checkout (git HEAD) to every worker, make
#            its venv with requirements + jax[tpu]; --index copies a built retrieval index
#            to ~/pafm_index on every worker (build it once with --mode=build_index)
#   train    --config=configs/sit_xl2.py --workdir=gs://BUCKET/run [--index]
#            start training on every worker in the background (log: ~/pafm_train.log)
#   logs     [--worker=0]                  follow a worker's log
#   fetch    --workdir=gs://BUCKET/run --to=DIR   copy results back (no checkpoints)
#   delete   [--queued]                    tear the slice down
#   run      all of create, setup, train and logs
#
#   launch/gcp_tpu.sh run sit-xl2 --zone=us-central2-b --type=v4-64 \
#       --config=configs/sit_xl2.py --workdir=gs://my-bucket/sit_xl2 -- --config.seed=1
#
# --dry-run (the first argument) prints the exact commands instead of running them. WORKDIR should be a gs:// path:
# checkpoints are written by all workers together. A preempted slice sends SIGTERM: the
# workers save at one agreed step and exit 0; `train` again resumes there.
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
usage() { sed -n '2,24p' "$0"; exit 2; }
[ $# -ge 2 ] || usage
STEP=$1 NAME=$2
shift 2
ZONE="" TYPE="" RUNTIME=tpu-ubuntu2204-base QUEUED=0 SPOT=0 INDEX="" CONFIG="" WORKDIR=""
WORKER=0 TO=""
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --zone=*) ZONE=${1#*=} ;;
    --type=*) TYPE=${1#*=} ;;
    --runtime=*) RUNTIME=${1#*=} ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --index=*) INDEX=${1#*=} ;;
    --index) INDEX=home ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --worker=*) WORKER=${1#*=} ;;
    --to=*) TO=${1#*=} ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gcp_tpu.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
require() {  # $1: option name, $2: its value
  if [ -z "$2" ]; then echo "gcp_tpu.sh $STEP needs --$1=..." >&2; exit 2; fi
}
require zone "$ZONE"

run() {  # runs (or with --dry-run prints) one command
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}
on_workers() {  # $1: worker(s), $2: the remote shell command
  run gcloud compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=$1" "--command=$2"
}

create() {
  require type "$TYPE"
  [ "$DRY_RUN" = 1 ] || command -v gcloud >/dev/null || {
    echo "gcloud is not installed: see https://cloud.google.com/sdk" >&2; exit 1; }
  local spot=()
  if [ "$SPOT" = 1 ]; then spot=(--spot); fi
  if [ "$QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "--zone=$ZONE" \
      "--accelerator-type=$TYPE" "--runtime-version=$RUNTIME" ${spot[@]+"${spot[@]}"}
    # Wait until the slice is granted.
    local describe=(gcloud compute tpus queued-resources describe "$NAME" "--zone=$ZONE"
                    '--format=value(state.state)')
    if [ "$DRY_RUN" = 1 ]; then
      run "${describe[@]}"
      echo "# (repeated every 30 s until it prints ACTIVE)"
    else
      local state
      while state=$("${describe[@]}"); [ "$state" != ACTIVE ]; do
        case $state in
          FAILED|SUSPENDED|DELETING) echo "gcp_tpu.sh: queued resource $NAME is $state" >&2; exit 1 ;;
        esac
        sleep 30
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$NAME" "--zone=$ZONE" "--accelerator-type=$TYPE" \
      "--version=$RUNTIME" ${spot[@]+"${spot[@]}"}
  fi
}

setup() {
  local tarball=/tmp/pafm_jax-$NAME.tar.gz
  run git -C "$REPO_DIR" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:pafm_jax.tar.gz" "--zone=$ZONE" --worker=all
  # The same jax version as requirements.txt, with the TPU runtime (expanded on the worker).
  # shellcheck disable=SC2016
  on_workers all 'set -e; rm -rf pafm_jax && mkdir pafm_jax && tar xzf pafm_jax.tar.gz -C pafm_jax && cd pafm_jax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && .venv/bin/pip install -q --no-deps -r requirements-nodeps.txt && .venv/bin/pip install -q "jax[tpu]==$(.venv/bin/python -c "import jax; print(jax.__version__)")"'
  if [ -n "$INDEX" ] && [ "$INDEX" != home ]; then
    # Each worker reads the retrieval index from its own disk; copied whole, then renamed, so
    # an interrupted copy is never taken for an index.
    on_workers all "rm -rf ~/pafm_index ~/pafm_index_tmp && gsutil -m -q cp -r '${INDEX%/}' ~/pafm_index_tmp && mv ~/pafm_index_tmp ~/pafm_index"
  fi
}

train() {
  require config "$CONFIG"
  require workdir "$WORKDIR"
  [ -f "$REPO_DIR/$CONFIG" ] || { echo "gcp_tpu.sh: no config $CONFIG in $REPO_DIR" >&2; exit 1; }
  local quoted
  quoted=$(printf ' %q' --distributed "--config=$CONFIG" "--workdir=$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})
  if [ -n "$INDEX" ]; then
    # shellcheck disable=SC2016  # $HOME is the worker's, expanded there
    quoted+=' --config.retrieval.index_dir="$HOME/pafm_index"'
  fi
  on_workers all "cd pafm_jax && nohup .venv/bin/python -m pafm_jax.main$quoted > ~/pafm_train.log 2>&1 < /dev/null &"
}

logs() {
  on_workers "$WORKER" 'tail -n 200 -F ~/pafm_train.log'
}

fetch() {
  require workdir "$WORKDIR"
  require to "$TO"
  run mkdir -p "$TO"
  # Samples, eval.json, config.json and TensorBoard events; checkpoints stay in the bucket.
  run gsutil -m rsync -r -x '^checkpoints/|^corrupt_checkpoints/' "$WORKDIR" "$TO"
}

delete() {
  if [ "$QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$NAME" "--zone=$ZONE" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "--zone=$ZONE" --quiet
  fi
}

case $STEP in
  create) create ;;
  setup) setup ;;
  train) train ;;
  logs) logs ;;
  fetch) fetch ;;
  delete) delete ;;
  run) create; setup; train; logs ;;
  *) echo "gcp_tpu.sh: unknown step $STEP" >&2; usage ;;
esac
