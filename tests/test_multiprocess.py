"""Two local processes (gloo) x 4 CPU devices == one process x 8 devices; save from 2, resume in 1."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.conftest import CPU_FAST_COMPILE, REPO

FLAGS = ["train", "--config=configs/quickstart.py", "--config.model.n_layer=2", "--config.model.d_model=64",
         "--config.dynamics.hidden=128", "--config.data.seq_len=64", "--config.log_every=1",
         "--config.eval_every=5", "--config.checkpoint.every=5", "--config.optimizer.schedule=constant"]


NO_CANARY = "--config.train.sharding_canary=False"  # the 1-process runs; the 2-process run checks it


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{CPU_FAST_COMPILE} --xla_force_host_platform_device_count={devices}",
              LOG_DIR=os.environ.get("LOG_DIR", "/tmp/nextlat_local"))


def _metrics(workdir, key="loss"):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    if key in row:
      out[row["step"]] = row[key]
  return out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_two_processes_match_one(tmp_path):
  env = dict(_env(4), PORT=str(_free_port()), LOG_DIR=str(tmp_path / "logs"),
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  multi = subprocess.run(["bash", "launch/local.sh", "2", "4", *FLAGS, f"--workdir={tmp_path / 'multi'}",
                          "--config.steps=10"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
  assert multi.returncode == 0, logs
  assert logs.count("sharding canary on mesh {'data': 8, 'fsdp': 1, 'tensor': 1}: max gradient error") == 2, logs
  # One uninterrupted 15-step reference (a constant schedule, so the run length does not change the LR).
  single = subprocess.run([sys.executable, "-m", "nextlat_jax.cli", *FLAGS, NO_CANARY, f"--workdir={tmp_path / 'single'}",
                           "--config.steps=15", "--config.eval_every=0"],  # its training losses only cwd=REPO, env=_env(8), capture_output=True, text=True,
                          timeout=900)
  assert single.returncode == 0, single.stderr[-2000:]
  got, want = _metrics(tmp_path / "multi"), _metrics(tmp_path / "single")
  assert sorted(got) == list(range(1, 11))
  for step in got:  # same mesh and global batch; only the collectives' summation order differs
    assert abs(got[step] - want[step]) < 2e-5, (step, got[step], want[step])
  assert _metrics(tmp_path / "multi", "eval_loss").keys() == {5, 10}
  data_dir = tmp_path / "multi" / "checkpoints" / "10" / "data"
  assert sorted(os.listdir(data_dir)) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  states = [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
  assert [(s["step"], s["process_index"]) for s in states] == [(10, 0), (10, 1)]

  # The 2-process checkpoint resumes in 1 process (8 devices): data repositioned from the step.
  resumed = subprocess.run([sys.executable, "-m", "nextlat_jax.cli", *FLAGS, NO_CANARY, f"--workdir={tmp_path / 'multi'}",
                            "--config.steps=15"], cwd=REPO, env=_env(8), capture_output=True, text=True,
                           timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "restored step 10" in resumed.stderr
  assert "repositioning the data from the step" in resumed.stderr
  got, want = _metrics(tmp_path / "multi"), _metrics(tmp_path / "single")
  for step in range(11, 16):
    assert abs(got[step] - want[step]) < 2e-5, (step, got[step], want[step])
