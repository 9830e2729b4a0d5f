"""launch/slurm.sbatch's signal plumbing, run with a fake `srun` on PATH (no SLURM needed): SIGTERM to the
batch shell (what `#SBATCH --signal=B:TERM@300` sends before the time limit) reaches the job step, whose
tasks get their grace period to save; the job's exit status is srun's."""
import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm.sbatch"

# The fake srun records its arguments, then each signal it gets; on TERM it "saves" for a moment (the
# grace period in use) and exits with $FAKE_STATUS, as the trainer exits 0 after its save.
FAKE_SRUN = """#!/usr/bin/env bash
echo "args $*" >> "$RECORD"
trap 'echo TERM >> "$RECORD"; sleep 0.5; echo saved >> "$RECORD"; exit "${FAKE_STATUS:-0}"' TERM
echo started >> "$RECORD"
if [[ -n "${FAKE_EXIT:-}" ]]; then exit "$FAKE_EXIT"; fi
while :; do sleep 0.05; done
"""


def start(tmp_path: pathlib.Path, **env: str) -> tuple[subprocess.Popen, pathlib.Path]:
  """The batch script under bash (as sbatch runs it) with the fake srun first on PATH."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  record = tmp_path / "record"
  full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record), "HOME": str(tmp_path), **env}
  proc = subprocess.Popen(["bash", str(SCRIPT), "train", "--config=configs/x.py", "--workdir=/runs/x"],
                          env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return proc, record


def lines(record: pathlib.Path) -> list[str]:
  return record.read_text().splitlines() if record.exists() else []


def wait_for(record: pathlib.Path, line: str, timeout_s: float = 20.0) -> None:
  deadline = time.monotonic() + timeout_s
  while line not in lines(record):
    assert time.monotonic() < deadline, f"fake srun never wrote {line!r}: {lines(record)}"
    time.sleep(0.02)


def test_sbatch_asks_for_term_with_a_grace_period():
  directives = re.findall(r"^#SBATCH (--\S+)", SCRIPT.read_text(), flags=re.M)
  assert "--signal=B:TERM@300" in directives and "--requeue" in directives, directives


@pytest.mark.parametrize("srun_status", [0, 3])
def test_term_to_the_batch_shell_reaches_srun(tmp_path, srun_status: int):
  proc, record = start(tmp_path, FAKE_STATUS=str(srun_status))
  try:
    wait_for(record, "started")
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGTERM)  # SLURM's --signal=B:TERM@300
    _, stderr = proc.communicate(timeout=20)
  finally:
    if proc.poll() is None:
      proc.kill()
  # srun got TERM, had its grace period (the shell waited for the save), and its status is the job's
  assert lines(record) == ["args --kill-on-bad-exit=1 nextlat train --config=configs/x.py --workdir=/runs/x "
                           "--distributed", "started", "TERM", "saved"], (lines(record), stderr)
  assert proc.returncode == srun_status, stderr
  assert "forwarding it to srun" in stderr


def test_only_train_is_launched(tmp_path):
  """Only `nextlat train` takes --distributed: another command is refused before srun starts."""
  env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "RECORD": str(tmp_path / "record")}
  (tmp_path / "srun").write_text(FAKE_SRUN)
  (tmp_path / "srun").chmod(0o755)
  out = subprocess.run(["bash", str(SCRIPT), "eval", "--workdir=/runs/x"], env=env, capture_output=True,
                       text=True, timeout=20)
  assert out.returncode == 2 and "got 'eval'" in out.stderr and not lines(tmp_path / "record"), out.stderr


def test_srun_failure_is_the_job_status(tmp_path):
  proc, record = start(tmp_path, FAKE_EXIT="7")
  _, stderr = proc.communicate(timeout=20)
  assert proc.returncode == 7 and lines(record)[-1] == "started", (lines(record), stderr)
