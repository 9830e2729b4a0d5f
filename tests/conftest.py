"""Test setup: 8 fake CPU devices (set before JAX is imported) and small shared helpers."""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _compilation_cache() -> None:
  """One persistent XLA compilation cache per test run, shared by the xdist workers and by the CLI
  subprocesses the tests start (they inherit the environment): many tests train the same tiny config
  in a fresh process, and a cache hit turns a ~10 s compile into a load. Executables are looked up by
  a hash of the program, the compile options and the backend, so results do not depend on it.
  max_size enables jax's file lock, so concurrent workers never read a half-written entry."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # the user's own cache, or the one the xdist controller made (workers inherit its env)
  path = tempfile.mkdtemp(prefix="nextlat_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["NEXTLAT_TEST_XLA_CACHE"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)


_compilation_cache()

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


def pytest_sessionfinish(session, exitstatus):
  """The process that made the run's compilation cache (the xdist controller) removes it."""
  path = os.environ.get("NEXTLAT_TEST_XLA_CACHE")
  if path and not hasattr(session.config, "workerinput") and path == os.environ["JAX_COMPILATION_CACHE_DIR"]:
    shutil.rmtree(path, ignore_errors=True)
