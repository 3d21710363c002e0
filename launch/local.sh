#!/usr/bin/env bash
# Rehearse a pod on one machine: N pafm_jax processes on 127.0.0.1 (jax.distributed, gloo).
#
#   launch/local.sh [--dry-run] N --config=CONFIG --workdir=DIR [more pafm_jax.main flags]
#   launch/local.sh 2 --config=configs/fmnist_sit.py --workdir=runs/local2
#
# Each process reads only its shard of every batch, process 0 logs to this terminal (and to
# LOG_DIR/process_0.log), the others to LOG_DIR/process_<i>.log; checkpoints are written by all
# of them together, and starting the same command again resumes. SIGTERM or Ctrl-C to this
# script reaches every process: they agree on a step, save it and exit 0, as on a preempted pod.
# If one process fails, the others are stopped and the script exits with its status.
#
# Environment: DEVICES_PER_PROCESS (1) CPU devices per process; PORT (a free one) of the
# coordinator; LOG_DIR (runs/local_logs); PYTHON (.venv/bin/python, else python3);
# JAX_PLATFORMS (cpu).
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
if [ $# -lt 1 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,15p' "$0"; exit 2
fi
NUM=$1
shift
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
DEVICES=${DEVICES_PER_PROCESS:-1}
LOG_DIR=${LOG_DIR:-runs/local_logs}
PLATFORMS=${JAX_PLATFORMS:-cpu}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${PORT:-}" ]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

command_for() {  # the exact command of process $1 (the rest: pafm_jax.main's flags)
  local id=$1
  shift
  printf 'cd %q && env XLA_FLAGS=--xla_force_host_platform_device_count=%q JAX_PLATFORMS=%q' \
    "$REPO_DIR" "$DEVICES" "$PLATFORMS"
  printf ' %q -m pafm_jax.main --distributed --coordinator_address=127.0.0.1:%q' "$PYTHON" "$PORT"
  printf ' --num_processes=%q --process_id=%q' "$NUM" "$id"
  printf ' %q' "$@"
  printf '\n'
}

if [ "$DRY_RUN" = 1 ]; then
  for ((i = 0; i < NUM; i++)); do
    echo "# process $i, logging to $LOG_DIR/process_$i.log$([ "$i" = 0 ] && echo ', shown here')"
    command_for "$i" "$@"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()
stop_all() {  # $1: the signal
  for pid in "${PIDS[@]}"; do kill "-$1" "$pid" 2>/dev/null || true; done
}
trap 'stop_all TERM' TERM INT
cd "$REPO_DIR"
for ((i = 0; i < NUM; i++)); do
  env "XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES" "JAX_PLATFORMS=$PLATFORMS" \
    "$PYTHON" -m pafm_jax.main --distributed "--coordinator_address=127.0.0.1:$PORT" \
    "--num_processes=$NUM" "--process_id=$i" "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  PIDS+=($!)
done
tail -n +1 -f "$LOG_DIR/process_0.log" --pid="${PIDS[0]}" &
TAIL=$!

status=0
declare -A RUNNING=()
for pid in "${PIDS[@]}"; do RUNNING[$pid]=1; done
while [ "${#RUNNING[@]}" -gt 0 ]; do
  finished=""
  code=0
  wait -n -p finished "${!RUNNING[@]}" || code=$?
  if [ -z "$finished" ]; then continue; fi  # interrupted by a forwarded signal: keep waiting
  unset "RUNNING[$finished]"
  if [ "$code" -ne 0 ] && [ "$status" = 0 ]; then
    status=$code
    echo "local.sh: process $finished exited with status $code; stopping the others (logs in $LOG_DIR)" >&2
    stop_all KILL
  fi
done
wait "$TAIL" 2>/dev/null || true
exit "$status"
