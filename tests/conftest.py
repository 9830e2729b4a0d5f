"""Test setup: 8 fake CPU devices (set before JAX is imported) and small shared helpers."""
import os

# LLVM at -O0: the suite's programs are tiny and compile-bound (measured: a sharded-gradient test 18.3 -> 12.4 s).
# HLO passes, SPMD partitioning and buffer assignment run as in a real run; only the machine code is slower.
CPU_FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {CPU_FAST_COMPILE}"
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache: with jax 0.10.2 an executable of the sharded Muon train step loaded from
# it aborts the process on XLA:CPU (docs/design.md, "Measurements").

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def shared_dir() -> pathlib.Path:
  """../shared beside the repo; tests that need it skip cleanly when it is absent."""
  if not SHARED.is_dir():
    pytest.skip("../shared is absent")
  return SHARED

