#!/usr/bin/env bash
# One-GPU device check (issue 8): GPT vs NextLat d=1 train steps of the 1.3B FineWeb-Edu model at the
# largest batch that fits; prints MFU, tokens/s and the step-time ratio; writes DIR/bench_step.json.
#   bash launch/device_check.sh [DIR] [extra flags, e.g. --config.model.remat=none]
# Needs jax with its GPU plugin, flax, optax, ml-collections, absl-py and tqdm. Packages missing on the
# machine can travel as wheels in ./.whl (launch/device_env.sh installs them first).
# On CPU, the same path on a tiny model: bash launch/device_check.sh DIR --config=configs/device_check.py:smoke
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-runs}/device_check}
shift || true
source launch/device_env.sh
$PY -m nextlat_jax.cli bench step --config=configs/device_check.py --workdir="$DIR" "$@"
