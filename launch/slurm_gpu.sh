#!/usr/bin/env bash
# Train pafm_jax on a GPU cluster under SLURM: one process per GPU (JAX's SLURM detection gives
# each task the GPU of its local rank).
#
#   launch/slurm_gpu.sh [--dry-run] --nodes=N --config=CONFIG --workdir=DIR [options] [-- flags]
#   launch/slurm_gpu.sh --nodes=4 --gpus-per-node=8 --partition=gpu --time=48:00:00 \
#       --config=configs/sit_xl2.py --workdir=/shared/runs/sit_xl2 -- --config.seed=1
#
# Options: --gpus-per-node (8), --partition, --time (24:00:00), --account, --venv (this
# checkout's .venv: make venv, then pip install "jax[cuda12]" of the same version).
# Writes the batch script to DIR/slurm/train.sbatch and submits it with sbatch; --dry-run
# (first argument) prints the script and the sbatch command instead. The checkout, the venv
# and DIR must be on a file system every node sees. jax.distributed finds its peers from
# SLURM's variables. SLURM sends SIGTERM 5 minutes before the time limit (--signal) and on
# preemption: the processes save at one agreed step and exit 0. A preempted job is requeued
# (--requeue) and resumes; one that reached its time limit is resumed by submitting it again.
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
usage() { sed -n '2,16p' "$0"; exit 2; }
NODES="" GPUS=8 PARTITION="" TIME=24:00:00 ACCOUNT="" CONFIG="" WORKDIR=""
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
VENV=$REPO_DIR/.venv
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --nodes=*) NODES=${1#*=} ;;
    --gpus-per-node=*) GPUS=${1#*=} ;;
    --partition=*) PARTITION=${1#*=} ;;
    --time=*) TIME=${1#*=} ;;
    --account=*) ACCOUNT=${1#*=} ;;
    --venv=*) VENV=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "slurm_gpu.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
if [ -z "$NODES" ] || [ -z "$CONFIG" ] || [ -z "$WORKDIR" ]; then usage; fi
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "slurm_gpu.sh: --nodes=$NODES is not a count" >&2; exit 2; }
[ -f "$REPO_DIR/$CONFIG" ] || { echo "slurm_gpu.sh: no config $CONFIG in $REPO_DIR" >&2; exit 1; }

batch_script() {
  echo '#!/usr/bin/env bash'
  echo "#SBATCH --job-name=pafm_jax"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$GPUS"
  echo "#SBATCH --gpus-per-node=$GPUS"
  echo "#SBATCH --time=$TIME"
  echo "#SBATCH --output=$WORKDIR/slurm/%j.log"
  echo "#SBATCH --open-mode=append"
  # SIGTERM to every task 5 minutes before the time limit: a checkpoint at an agreed step.
  echo "#SBATCH --signal=TERM@300"
  echo "#SBATCH --requeue"
  if [ -n "$PARTITION" ]; then echo "#SBATCH --partition=$PARTITION"; fi
  if [ -n "$ACCOUNT" ]; then echo "#SBATCH --account=$ACCOUNT"; fi
  echo 'set -euo pipefail'
  printf 'cd %q\n' "$REPO_DIR"
  printf 'srun --kill-on-bad-exit=1 %q -m pafm_jax.main --distributed' "$VENV/bin/python"
  printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"}
  printf '\n'
}

SCRIPT=$WORKDIR/slurm/train.sbatch
if [ "$DRY_RUN" = 1 ]; then
  echo "# $SCRIPT"
  batch_script
  printf '# then\nsbatch %q\n' "$SCRIPT"
  exit 0
fi
command -v sbatch >/dev/null || { echo "slurm_gpu.sh: sbatch not found (is this a SLURM login node?)" >&2; exit 1; }
mkdir -p "$WORKDIR/slurm"
batch_script > "$SCRIPT.tmp"
mv "$SCRIPT.tmp" "$SCRIPT"
sbatch "$SCRIPT"
