#!/usr/bin/env bash
# One-GPU device check (issue 8): GPT vs NextLat d=1 train steps of the 1.3B FineWeb-Edu model at the
# largest batch that fits; prints MFU, tokens/s and the step-time ratio; writes DIR/bench_step.json.
#   bash launch/device_check.sh [DIR] [extra flags, e.g. --config.model.remat=none]
# Needs jax with its GPU plugin, flax, optax, ml-collections, absl-py and tqdm. Packages missing on the
# machine can travel as wheels in ./.whl (see docs/benchmarks.md); they are installed first if present.
# On CPU, the same path on a tiny model: bash launch/device_check.sh DIR --config=configs/device_check.py:smoke
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-runs}/device_check}
shift || true
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# GPU: take 95% of the memory up front (the fit search budgets against it); overlap collectives.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
if [ "${JAX_PLATFORMS:-}" != "cpu" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
fi
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/nextlat_jax_cache}
PY=${PYTHON:-python3}
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
$PY -m nextlat_jax.cli bench step --config=configs/device_check.py --workdir="$DIR" "$@"
