#!/usr/bin/env bash
# Run the same nextlat command on every worker of a Cloud TPU VM pod slice (jax.distributed detects
# the TPU topology by itself). Install the package on the workers first with the `setup` action.
#   launch/tpu_pod.sh NAME ZONE setup                       # pip install this checkout on all workers
#   launch/tpu_pod.sh NAME ZONE train --config=configs/fineweb_edu_1p3b.py --workdir=gs://bucket/runs/x
set -euo pipefail
NAME=${1:?TPU name}; ZONE=${2:?zone}; shift 2
ssh_all() { gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"; }
if [[ "${1:-}" == "setup" ]]; then
  REPO=${REPO:-$(git config --get remote.origin.url)}
  ssh_all "pip install -U 'jax[tpu]' && rm -rf ~/nextlat_jax && git clone $REPO ~/nextlat_jax && pip install -e ~/nextlat_jax"
  exit 0
fi
if [[ "${1:-}" != train ]]; then  # only `nextlat train` takes --distributed: read a run on one host
  echo "launch/tpu_pod.sh: runs \`nextlat train ...\` on every worker (got '${1:-}'); other commands take no --distributed" >&2
  exit 2
fi
# XLA flags that matter on TPU: async collectives overlapped with compute by the latency-hiding scheduler.
TPU_FLAGS="--xla_tpu_enable_latency_hiding_scheduler=true --xla_tpu_enable_async_collective_fusion=true"
ARGS=$(printf '%q ' "$@")
ssh_all "cd ~/nextlat_jax && LIBTPU_INIT_ARGS='$TPU_FLAGS' nohup nextlat $ARGS --distributed > ~/nextlat.log 2>&1 &"
echo "started on all workers of $NAME; logs: ~/nextlat.log on each worker (process 0 writes metrics)"
