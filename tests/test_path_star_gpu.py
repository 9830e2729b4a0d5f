"""launch/path_star_gpu.sh: the real trainer and evaluator on the tiny preset (the script's whole path on
CPU), and its time-limit plumbing with a fake `python` whose training only stops on SIGTERM."""
import json
import os
import subprocess
import sys

from tests.conftest import CPU_FAST_COMPILE, REPO

SCRIPT = str(REPO / "launch" / "path_star_gpu.sh")

# Stands in for python: `-m nextlat_jax.cli train` saves on SIGTERM and exits 0 (as the trainer does), or
# exits $FAKE_TRAIN_EXIT; `eval` prints the evaluator's task line; anything else runs the real python.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == -m && "$3" == train ]]; then
  echo "train $*" >> "$RECORD"
  if [[ -n "${FAKE_TRAIN_EXIT:-}" ]]; then exit "$FAKE_TRAIN_EXIT"; fi
  trap 'echo TERM >> "$RECORD"; exit 0' TERM
  while :; do sleep 0.05; done
elif [[ "$1" == -m && "$3" == eval ]]; then
  echo '{"path_star": {"step": 7, "num_examples": 9, "greedy/exact_path_accuracy": 12.5, "sample_t1/exact_path_accuracy": 2.5}}'
else
  exec "$REAL_PYTHON" "$@"
fi
"""


def _env(tmp_path, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"))
  env["XLA_FLAGS"] = CPU_FAST_COMPILE  # one CPU device
  env.update(extra)
  return env


def test_trains_and_evaluates_both_runs_on_the_tiny_preset(tmp_path):
  out = subprocess.run(["bash", SCRIPT, str(tmp_path), "300", "300", "--config.steps=6", "--config.checkpoint.every=3"],
                       cwd=REPO, env=_env(tmp_path, PRESET="tiny"), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads((tmp_path / "path_star_gpu.json").read_text())
  assert sorted(res) == ["gpt", "nextlat"]
  for obj, r in res.items():
    assert r["step"] == 6 and r["num_examples"] == 256, obj
    assert 0 <= r["greedy_exact_path"] <= 100 and 0 <= r["sample_t1_exact_path"] <= 100
    assert (tmp_path / obj / "checkpoints" / "6").is_dir()
    assert f"path_star_gpu: {obj} at step 6: exact path greedy" in out.stdout


def _fake(tmp_path) -> dict:
  fake = tmp_path / "fake_python"
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  return _env(tmp_path, PYTHON=str(fake), REAL_PYTHON=sys.executable, RECORD=str(tmp_path / "record"))


def test_the_time_limit_stops_training_with_sigterm_and_the_script_goes_on(tmp_path):
  out = subprocess.run(["bash", SCRIPT, str(tmp_path), "2", "1"], cwd=REPO, env=_fake(tmp_path),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  record = (tmp_path / "record").read_text().splitlines()
  assert [line.split()[0] for line in record] == ["train", "TERM", "train", "TERM"]
  assert "--config=configs/path_star.py:nextlat" in record[0] and "--config=configs/path_star.py:gpt" in record[2]
  res = json.loads((tmp_path / "path_star_gpu.json").read_text())
  assert res["nextlat"] == {"step": 7, "greedy_exact_path": 12.5, "sample_t1_exact_path": 2.5, "num_examples": 9}


def test_a_failed_training_stops_the_script_with_its_code(tmp_path):
  out = subprocess.run(["bash", SCRIPT, str(tmp_path), "30", "30"], cwd=REPO, env=_fake(tmp_path) | {"FAKE_TRAIN_EXIT": "3"},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 3
  assert "path_star_gpu: nextlat training exited with code 3" in out.stderr
  record = (tmp_path / "record").read_text().splitlines()  # GPT never started
  assert len(record) == 1 and "configs/path_star.py:nextlat" in record[0]
  assert not (tmp_path / "path_star_gpu.json").exists()
