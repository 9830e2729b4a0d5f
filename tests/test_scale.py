"""The 1.3B FineWeb-Edu preset: parameter counts (`nextlat info`) and a compile check on a simulated
8-device mesh that reports per-device memory, with nothing allocated."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import CPU_FAST_COMPILE, REPO


def _run(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = CPU_FAST_COMPILE  # one CPU device
  out = subprocess.run([sys.executable, "-m", "nextlat_jax.cli", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


@pytest.mark.parametrize("preset,train,infer", [("gpt", 1.32e9, 1.32e9), ("nextlat_d1", 1.40e9, 1.32e9)])
def test_info_parameter_counts(preset, train, infer):
  info = _run("info", f"--config=configs/fineweb_edu_1p3b.py:{preset}")
  assert abs(info["params"]["training"]["total"] / train - 1) < 0.005
  assert abs(info["params"]["inference"]["total"] / infer - 1) < 0.005


def test_compile_check_1p3b_on_8_simulated_devices():
  out = _run("compile-check", "--config=configs/fineweb_edu_1p3b.py:nextlat_d1", "--mesh=1,8,1")
  assert out["devices"] == 8 and out["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert out["params"] == {"dynamics": 82_726_912, "trunk": 1_319_200_768}
  mem = out["per_device_memory_gib"]
  # FSDP over 8 devices: parameters + AdamW state (3 x 1.40B x 4 bytes) / 8 = 1.96 GiB of arguments
  assert abs(mem["arguments"] - 3 * 1_401_927_680 * 4 / 8 / 2**30) < 0.05
  assert 0 < mem["total"] < 80  # fits an 80 GB accelerator with the preset's 8 microbatches


@pytest.mark.parametrize("mesh, why", [("2,x,1", "size 'x'"), ("3,1", "expected three sizes"),
                                       ("0,1,1", "size '0'"), ("-1,1,1", "size '-1'"), ("", "expected three")])
def test_compile_check_bad_mesh_is_one_line(mesh, why):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=CPU_FAST_COMPILE)
  out = subprocess.run([sys.executable, "-m", "nextlat_jax.cli", "compile-check", "--config=configs/quickstart.py",
                        "--config.model.vocab_size=74", f"--mesh={mesh}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stdout == "", out.stderr[-3000:]
  lines = out.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"config error: --mesh={mesh!r}: ") and why in lines[0], lines


def test_compile_check_fills_data_derived_values():
  """An explicit vocab_size does not skip the rest of what training reads from the data (the EOS id)."""
  from configs import quickstart
  from nextlat_jax import compile_check
  config = quickstart.get_config()
  config.model.update(vocab_size=80, n_layer=1, d_model=32, n_head=2)
  config.dynamics.hidden = 32
  config.data.seq_len, config.batch_size = 16, 8
  out = compile_check.check(config, (8, 1, 1))  # the suite's 8 CPU devices
  assert out["devices"] == 8 and out["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert out["per_device_memory_gib"]["total"] > 0
  bad = quickstart.get_config()
  bad.data.seq_len = 0
  with pytest.raises(compile_check.ConfigError, match=r"^config error: data='street_grid': data\.seq_len=0"):
    compile_check.check(bad)
