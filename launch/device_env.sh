# Sourced by the one-GPU scripts (device_check.sh, path_star_gpu.sh) from the repository root: installs
# wheels carried in ./.whl (see docs/benchmarks.md), puts the repository on PYTHONPATH, takes 95% of GPU
# memory up front, overlaps collectives, keeps a compilation cache, prints the devices. Sets PY.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
if [ "${JAX_PLATFORMS:-}" != "cpu" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
fi
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/nextlat_jax_cache}
PY=${PYTHON:-python3}
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
