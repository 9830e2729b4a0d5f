#!/usr/bin/env bash
# Start N processes of one job on this machine, each with D CPU devices, joined by JAX's distributed
# runtime (gloo collectives): the same multi-controller code path as a pod, without one.
#   launch/local.sh 2 4 train --config=configs/quickstart.py --workdir=runs/local2
# Logs of process i go to ${LOG_DIR:-/tmp/nextlat_local}/process_i.log; exits with the worst status.
set -uo pipefail
N=${1:?number of processes}; D=${2:?devices per process}; shift 2
if [[ "${1:-}" != train ]]; then  # only `nextlat train` takes --distributed: read a run on one host
  echo "launch/local.sh: runs \`nextlat train ...\` on every process (got '${1:-}'); other commands take no --distributed" >&2
  exit 2
fi
PORT=${PORT:-$((20000 + RANDOM % 20000))}
LOG_DIR=${LOG_DIR:-/tmp/nextlat_local}
mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$D" \
    nextlat "$@" --coordinator_address="localhost:$PORT" --num_processes="$N" --process_id="$i" \
    >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
