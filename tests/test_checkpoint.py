"""Checkpoints: exact resume after SIGKILL, SIGTERM, restore onto other meshes, corrupt checkpoints, NaN guard."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nextlat_jax.data import pipeline
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import checkpoint, evaluate, resume
from nextlat_jax.train import step as step_lib
from tests.conftest import CPU_FAST_COMPILE, REPO

sys.path.insert(0, str(REPO))
from configs import quickstart  # noqa: E402

TINY = ["--config.model.n_layer=2", "--config.model.d_model=64", "--config.dynamics.hidden=128",
        "--config.data.seq_len=64", "--config.batch_size=8", "--config.eval_every=0", "--config.log_every=1",
        "--config.checkpoint.every=5"]


def _cli(workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = CPU_FAST_COMPILE  # one CPU device
  return subprocess.Popen([sys.executable, "-m", "nextlat_jax.cli", "train", "--config=configs/quickstart.py",
                           f"--workdir={workdir}", *TINY, *flags],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(workdir) -> dict[int, float]:
  """Per-step loss; a step logged twice (re-run after a crash) keeps its last value."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      if not line.endswith("\n"):  # being written right now
        break
      row = json.loads(line)
      if "loss" in row:
        out[row["step"]] = row["loss"]
  return out


def _wait_for_step(proc, workdir, step, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if max(_losses(workdir), default=0) >= step or proc.poll() is not None:
      return
    time.sleep(0.02)


def test_sigkill_resume_is_bit_exact(tmp_path):
  n = 60
  ref = _cli(tmp_path / "ref", f"--config.steps={n}")
  killed_dir = tmp_path / "killed"
  proc = _cli(killed_dir, f"--config.steps={n}")
  _wait_for_step(proc, killed_dir, 17)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_losses(killed_dir))
  assert proc.returncode == -signal.SIGKILL and 17 <= killed_at < n, (proc.returncode, killed_at)
  resumed = _cli(killed_dir, f"--config.steps={n}")
  _, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-3000:]
  assert "restored step" in err
  ref.communicate(timeout=600)
  assert ref.returncode == 0
  expected, got = _losses(tmp_path / "ref"), _losses(killed_dir)
  assert sorted(got) == list(range(1, n + 1))
  assert got == expected  # bit for bit: the same float32 values in the JSON


def test_sigterm_saves_and_exits_zero(tmp_path):
  proc = _cli(tmp_path, "--config.steps=100000")
  _wait_for_step(proc, tmp_path, 8)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  last = max(_losses(tmp_path))
  mgr = checkpoint.manager(str(tmp_path / "checkpoints"), ml_collections.ConfigDict({"keep": 3}), read_only=True)
  assert mgr.latest_step() == last
  cfg = checkpoint.saved_config(str(tmp_path / "checkpoints"))
  assert cfg["model"]["d_model"] == 64
  data_state = json.loads((tmp_path / "checkpoints" / str(last) / "data" / "process_0-of-1.json").read_text())
  assert data_state["step"] == last
  # `nextlat eval`: parameters only, restored onto this process's 8 devices (the run used 1).
  result = evaluate.evaluate_run(str(tmp_path), eval_steps=2)
  assert result["step"] == last and np.isfinite(result["eval_loss"])
  assert json.loads((tmp_path / f"eval_{last}.json").read_text()) == result
  again = evaluate.evaluate_run(str(tmp_path), eval_steps=2, mesh_overrides=dict(data=2, fsdp=2, tensor=2))
  assert abs(again["eval_loss"] - result["eval_loss"]) < 1e-5


def _config(**model):
  c = quickstart.get_config()
  c.model.update(n_layer=2, d_model=64, **model)
  c.dynamics.hidden = 128  # as TINY, so checkpoints written by the CLI runs restore here
  c.data.seq_len = 64
  c.batch_size = 8
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  with c.unlocked():
    c.data.eos_id = 1
  c.model.vocab_size = 74
  return c


def _setup(config, devices, data=1, fsdp=1, tensor=1):
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return step_lib.build(config, make_mesh(config.mesh, devices=devices))


def _batch(config, setup, step=0):
  ds = pipeline.make_dataset(config.data, split="train", global_batch_size=config.batch_size, seed=0,
                             process_index=0, process_count=1)
  return step_lib.global_batch(ds[step], setup.batch_sharding)


def test_restore_onto_other_meshes_and_params_only(tmp_path):
  config = _config()
  devices = jax.devices()
  assert len(devices) == 8
  big = _setup(config, devices, data=2, fsdp=2, tensor=2)
  state, _ = big.step(big.init(jax.random.PRNGKey(0)), _batch(config, big), jax.random.PRNGKey(0))
  data_iter = pipeline.BatchIterator(
      pipeline.make_dataset(config.data, split="train", global_batch_size=8, seed=0, process_index=0,
                            process_count=1), 1, {})
  mgr = checkpoint.manager(str(tmp_path), config.checkpoint)
  checkpoint.save(mgr, 1, state, data_iter, config, force=True)
  mgr.wait_until_finished()
  expected = jax.device_get(state.params)
  next_batch = None
  for n_dev, mesh in ((4, dict(data=1, fsdp=2, tensor=2)), (1, {})):
    small = _setup(config, devices[:n_dev], **mesh)
    restored = checkpoint.restore_step(mgr, None, small.abstract_state)
    assert int(restored.step) == 1
    leaf = restored.params["trunk"]["blocks"]["qkv"]["kernel"]
    assert leaf.sharding.mesh.devices.size == n_dev
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), expected)
    # and training continues on the new mesh, identically on 4 devices and 1
    _, metrics = small.step(restored, _batch(config, small, step=1), jax.random.PRNGKey(0))
    loss = float(metrics["loss"])
    next_batch = loss if next_batch is None else next_batch
    assert abs(loss - next_batch) < 1e-5
  params, step = checkpoint.restore_params(str(tmp_path), small.abstract_state.params)
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)


def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path, caplog):
  config = _config()
  setup = _setup(config, jax.devices()[:1])
  state = setup.init(jax.random.PRNGKey(0))
  mgr = checkpoint.manager(str(tmp_path / "checkpoints"), config.checkpoint)
  for step in (1, 2):
    state, _ = setup.step(state, _batch(config, setup), jax.random.PRNGKey(0))
    checkpoint.save(mgr, step, state, None, config, force=True)
    mgr.wait_until_finished()
  # Corrupt every file of the newest checkpoint's parameters.
  for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "params"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with caplog.at_level("WARNING", logger="nextlat_jax"):
    restored = resume.resume(str(tmp_path), setup.abstract_state, None, json.loads(config.to_json()))
  assert int(restored.step) == 1
  assert any(f"checkpoint {tmp_path}/checkpoints/2 is unreadable" in r.getMessage() for r in caplog.records), caplog.text
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2.corrupt"]


@pytest.mark.parametrize("guard", ["skip", "stop"])
def test_nan_guard(tmp_path, guard):
  # An absurd learning rate makes step 1's update overflow, so step 2's loss is not finite.
  proc = _cli(tmp_path, "--config.steps=6", "--config.optimizer.lr=1e30", "--config.optimizer.warmup_steps=0",
              "--config.optimizer.schedule=constant", f"--config.nan_guard={guard}")
  _, err = proc.communicate(timeout=600)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
  if guard == "stop":
    assert proc.returncode == 1, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith("training stopped:")]
    assert lines and "non-finite loss or gradient at step 2" in lines[0], err[-2000:]
    assert [r["step"] for r in rows] == [1]
    steps = os.listdir(tmp_path / "checkpoints") if (tmp_path / "checkpoints").exists() else []
    assert not [s for s in steps if s.isdigit() and int(s) >= 2]
  else:
    assert proc.returncode == 0, err[-2000:]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert "update skipped" in err
    mgr = checkpoint.manager(str(tmp_path / "checkpoints"), ml_collections.ConfigDict({"keep": 3}),
                             read_only=True)
    assert mgr.latest_step() == 6
    config = _config()
    setup = _setup(config, jax.devices()[:1])
    params, _ = checkpoint.restore_params(str(tmp_path / "checkpoints"), setup.abstract_state.params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_metrics_writer_repairs_a_line_torn_by_a_kill(tmp_path):
  from nextlat_jax.train.metrics_writer import MetricsWriter
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  w = MetricsWriter(str(tmp_path), enabled=True, total_steps=4, initial_step=1)
  w.write(2, {"loss": 1.5})
  w.close()
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
