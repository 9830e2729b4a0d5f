"""A run is never silently lost: resume refuses incompatible configs, moves unreadable checkpoints aside,
verifies saves, saves on Ctrl-C and on errors, and checks data and workdir before compiling."""
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nextlat_jax.data import pipeline
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.parallel.sharding import batch_sharding, logical_rules
from nextlat_jax.train import checkpoint, interrupts, preflight, resume, trainer
from tests.conftest import CPU_FAST_COMPILE, REPO
from tests.test_checkpoint import TINY, _config, _losses, _setup, _wait_for_step

sys.path.insert(0, str(REPO))
from configs import quickstart  # noqa: E402

LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")


def _run(workdir, *flags, steps=10):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = CPU_FAST_COMPILE  # one CPU device
  return subprocess.run([sys.executable, "-m", "nextlat_jax.cli", "train", "--config=configs/quickstart.py",
                         f"--workdir={workdir}", *TINY, f"--config.steps={steps}", *flags],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _snapshot(root) -> dict[str, str]:
  """Every file under `root` -> sha256 of its bytes."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def _our_lines(stderr: str) -> list[str]:
  """stderr without Orbax's absl chatter (lines like `W1201 12:00:00.0 file.py:1] ...`)."""
  return [l for l in stderr.splitlines() if l.strip() and not re.match(r"[IWE]\d{4} ", l)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A finished 10-step run with checkpoints at steps 5 and 10."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]
  return workdir


def _copy(base_run, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(base_run, dst)
  return dst


@pytest.mark.parametrize("flags, expected", [
    (["--config.dynamics.hidden=64"],
     r"parameter leaf dynamics/fc1/kernel is \(128, 128\) float32 in the checkpoint, \(128, 64\) float32 in this config"),
    (["--config.objective.name=gpt"], r"trained with objective.name='nextlat', this config has 'gpt'"),
    (["--config.optimizer.name=muon"], r"optimizer-state leaf .*--config\.checkpoint\.restore_from=(\S+)$"),
])
def test_incompatible_config_stops_and_changes_nothing(base_run, tmp_path, flags, expected):
  workdir = _copy(base_run, tmp_path)
  before = _snapshot(workdir)
  out = _run(workdir, *flags, steps=20)
  assert out.returncode == 2, out.stderr[-3000:]
  lines = _our_lines(out.stderr)
  assert len(lines) == 1 and lines[0].startswith(f"config error: workdir='{workdir}'"), out.stderr[-3000:]
  match = re.search(expected, lines[0])
  assert match, lines[0]
  assert _snapshot(workdir) == before  # config.json, metrics.jsonl, every checkpoint byte for byte
  if match.groups():  # the suggested warm start works: these weights, a fresh optimizer state
    out = _run(tmp_path / "warm", *flags, f"--config.checkpoint.restore_from={match.group(1)}", steps=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "started from the parameters of" in out.stderr and min(_losses(tmp_path / "warm")) == 1


def _garble(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "params")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")


def test_unreadable_newest_is_moved_aside_and_saved_again(base_run, tmp_path):
  workdir = _copy(base_run, tmp_path)
  original = _losses(workdir)
  _garble(workdir / "checkpoints" / "10")
  out = _run(workdir, steps=12)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"checkpoint {workdir}/checkpoints/10 is unreadable" in out.stderr
  assert f"moved unreadable checkpoint {workdir}/checkpoints/10 aside" in out.stderr
  assert "restored step 5" in out.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "10.corrupt", "12", "5"]
  checkpoint.verify_saved(checkpoint.manager(str(workdir / "checkpoints"), None, read_only=True), 10)
  resumed = _losses(workdir)
  assert [resumed[s] for s in range(6, 11)] == [original[s] for s in range(6, 11)]  # bit-exact from step 5
  # Parameters of an unreadable step: one line naming it, for eval / generate / export alike.
  _garble(workdir / "checkpoints" / "12")
  setup = _setup(_config(), jax.devices()[:1])
  with pytest.raises(checkpoint.CheckpointMissing, match=r"checkpoints/12 is unreadable \(.*\); pass --step="):
    checkpoint.restore_params(str(workdir / "checkpoints"), setup.abstract_state.params, 12)
  with pytest.raises(checkpoint.CheckpointMissing, match=r"no checkpoint of step 11 .*saved steps: 5, 10, 12"):
    checkpoint.restore_params(str(workdir / "checkpoints"), setup.abstract_state.params, 11)


def test_no_readable_checkpoint_stops_unless_fresh_start_is_allowed(base_run, tmp_path):
  workdir = _copy(base_run, tmp_path)
  for step in ("5", "10"):
    _garble(workdir / "checkpoints" / step)
  before = _snapshot(workdir)
  out = _run(workdir, steps=12)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "no readable checkpoint among steps [5, 10]" in _our_lines(out.stderr)[-1]
  assert _snapshot(workdir) == before
  out = _run(workdir, "--config.checkpoint.allow_fresh_start=True", steps=5)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10.corrupt", "5", "5.corrupt"]


def test_an_empty_index_is_refused_without_tracebacks(base_run, tmp_path, monkeypatch):
  """Empty OCDBT manifests (a disk that filled up, say) are found before Orbax reads the arrays: it
  reads them all at once, and a failed read left the others to print "Event loop is closed" tracebacks."""
  workdir = _copy(base_run, tmp_path)
  for step in ("5", "10"):
    open(workdir / "checkpoints" / step / "params" / "manifest.ocdbt", "wb").close()
  before = _snapshot(workdir)
  for _ in range(2):  # the tracebacks were a race: not every run printed them
    out = _run(workdir, steps=20)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr[-3000:]
    lines = _our_lines(out.stderr)
    assert len(lines) == 3 and "no readable checkpoint among steps [5, 10]" in lines[-1], lines
    assert all("unreadable" in line and "manifest.ocdbt" in line for line in lines[:2]), lines
  assert _snapshot(workdir) == before
  # Orbax is never asked to read the damaged checkpoints' arrays (their metadata included)
  calls = []
  for name in ("item_metadata", "restore"):
    def spy(self, *args, _original=getattr(ocp.CheckpointManager, name), _name=name, **kwargs):
      calls.append(_name)
      return _original(self, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, name, spy)
  config = _config()
  with pytest.raises(resume.ResumeRefused, match=r"no readable checkpoint among steps \[5, 10\]"):
    resume.resume(str(workdir), _setup(config, jax.devices()[:1]).abstract_state, None, json.loads(config.to_json()))
  assert calls == []


def test_skipped_or_incomplete_saves_are_errors(tmp_path):
  config = _config()
  setup = _setup(config, jax.devices()[:1])
  state = setup.init(jax.random.PRNGKey(0))
  mgr = checkpoint.manager(str(tmp_path), config.checkpoint)
  checkpoint.save(mgr, 5, state, None, config)
  mgr.wait_until_finished()
  with pytest.raises(checkpoint.SaveError, match="save of step 3 was skipped by Orbax"):
    checkpoint.save(mgr, 3, state, None, config)  # Orbax declines steps <= its newest
  saver = checkpoint.BackgroundSaver(mgr)
  saver.save(7, state, None, config)
  saver.wait()
  shutil.rmtree(tmp_path / "7" / "opt_state")
  with pytest.raises(checkpoint.SaveError, match="save of step 7 did not complete: .* lacks opt_state"):
    checkpoint.verify_saved(mgr, 7)
  saver.close()


def test_ctrl_c_saves_at_the_step_boundary_and_exits_130(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = CPU_FAST_COMPILE  # one CPU device
  proc = subprocess.Popen([sys.executable, "-m", "nextlat_jax.cli", "train", "--config=configs/quickstart.py",
                           f"--workdir={tmp_path}", *TINY, "--config.steps=100000", "--config.checkpoint.every=1000"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(proc, tmp_path, 6)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err
  last = max(_losses(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == [str(last)]
  assert f"interrupted (Ctrl-C) after step {last}; saved step {last}; the same command resumes" in err
  # A log line never shares a line with the progress bar (tqdm's redraws are separated by \r).
  for line in err.split("\n"):
    if LOG_LINE.search(line):
      assert LOG_LINE.match(line.split("\r")[-1]), repr(line)


def test_second_ctrl_c_aborts_at_once():
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a pytest-xdist worker
  with interrupts.StopRequests() as stops:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert stops.interrupted and stops.reached(1)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) == before  # the handlers are put back


def _inproc_config(workdir_steps: int = 12):
  c = quickstart.get_config()
  c.model.update(n_layer=2, d_model=64)
  c.dynamics.hidden = 128
  c.data.seq_len = 64
  c.update(batch_size=8, eval_every=0, log_every=1, steps=workdir_steps)
  c.checkpoint.every = 5
  c.train.sharding_canary = False  # tests/test_canary.py covers it
  return c


class _Failing:
  """Wraps BatchIterator.__next__ to raise `error` when asked for the batch of step `at`."""

  def __init__(self, monkeypatch, at: int, error: BaseException):
    original = pipeline.BatchIterator.__next__

    def failing(it):
      if it.step == at:
        raise error
      return original(it)
    monkeypatch.setattr(pipeline.BatchIterator, "__next__", failing)


@pytest.mark.parametrize("error, raised", [(OSError("disk gone"), OSError), (StopIteration(), interrupts.TrainingStopped)])
def test_an_error_in_the_loop_saves_the_last_state_first(tmp_path, monkeypatch, error, raised):
  _Failing(monkeypatch, 7, error)
  with pytest.raises(raised) as info:
    trainer.train(_inproc_config(), str(tmp_path))
  if raised is interrupts.TrainingStopped:
    assert "the train data ran out after step 7" in str(info.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5", "7"]
  data_state = json.loads((tmp_path / "checkpoints" / "7" / "data" / "process_0-of-1.json").read_text())
  assert data_state["step"] == 7


def test_data_and_workdir_are_checked_before_anything_is_written(tmp_path):
  out = _run(tmp_path / "w", "--config.data.num_rows=64", steps=20)
  assert out.returncode == 2, out.stderr[-3000:]
  assert _our_lines(out.stderr) == ["config error: steps=20: the train data holds 64 rows = 8 steps of "
                                    "batch_size=8; lower steps or add data"]
  assert not (tmp_path / "w").exists()
  (tmp_path / "file").write_text("x")
  out = _run(tmp_path / "file")
  assert out.returncode == 2 and _our_lines(out.stderr) == [
      f"config error: workdir='{tmp_path}/file': exists and is not a directory"], out.stderr[-3000:]
  assert (tmp_path / "file").read_text() == "x"


def test_a_read_only_workdir_is_refused():
  tmp_path = pathlib.Path(tempfile.mkdtemp())  # 0700 like pytest's tmp_path; opened to others below
  os.chmod(tmp_path, 0o755)
  (tmp_path / "ro").mkdir()
  os.chmod(tmp_path / "ro", 0o555)
  as_root = os.geteuid() == 0
  if as_root:  # root may write anywhere: check as an unprivileged user (CI runs as root)
    os.seteuid(65534)
  try:
    with pytest.raises(preflight.config_lib.ConfigError, match=r"workdir='.*/ro/run': .*/ro is not writable"):
      preflight.check_workdir(str(tmp_path / "ro" / "run"))
  finally:
    if as_root:
      os.seteuid(0)
  assert os.listdir(tmp_path / "ro") == []
  shutil.rmtree(tmp_path)


def test_process_rows_are_checked_against_the_batch_sharding():
  rules = logical_rules(quickstart.get_config())
  for shape, hosts, contiguous in (((2, 1, 4), lambda d: d.id // 4, True),  # tensor within a host
                                   ((4, 1, 2), lambda d: d.id // 4, True),
                                   ((2, 2, 2), lambda d: d.id // 4, False),  # data across hosts, fsdp-major rows
                                   ((2, 1, 4), lambda d: d.id % 2, None)):  # tensor replicas on two hosts
    mesh = make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape))))
    sharding = batch_sharding(mesh, rules)
    rows = pipeline.process_row_ranges(sharding, 16, 9, hosts)
    assert sorted(rows) == [0, 1] and np.prod(shape) == len(jax.devices())
    if contiguous is None:
      with pytest.raises(ValueError, match=r"process 0's devices hold 16 rows .*, 16 of them also held by "
                                           r"another process.*keep mesh.tensor within a host"):
        pipeline.check_process_rows(sharding, 16, 9, 2, hosts)
      continue
    pipeline.check_process_rows(sharding, 16, 9, 2, hosts)
    assert (rows[0] == set(range(8))) == contiguous, (shape, sorted(rows[0]))
