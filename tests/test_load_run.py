"""`nextlat_jax.run.load_run`: a run's saved parameters come back exactly, onto meshes other than the
training mesh, with the shardings training used, without an optimizer; and a missing step is one line."""
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest

from nextlat_jax.data import pipeline
from nextlat_jax.parallel.mesh import make_mesh, mesh_shape
from nextlat_jax.run import load_run
from nextlat_jax.train import checkpoint, preflight
from nextlat_jax.train import step as step_lib
from tests.conftest import REPO
from tests.tiny import assert_trees_equal

TRAIN_MESH = dict(data=2, fsdp=2, tensor=2)
# objective -> where it is loaded: a dict of axis sizes over the 8 devices, a Mesh of 4 devices, or the
# default (all 8 on `data`: parameters replicated); none of them is the training mesh.
LOAD_ONTO = {"gpt": dict(fsdp=4, tensor=2), "nextlat": (1, 2, 2), "mtp": None}


def _config(objective: str) -> ml_collections.ConfigDict:
  import sys
  sys.path.insert(0, str(REPO))
  from configs import quickstart
  c = quickstart.get_config(objective)
  c.model.update(n_layer=2, d_model=32, n_head=2)
  c.dynamics.hidden = 64
  c.data.seq_len = 16
  c.batch_size = 8
  c.mesh.update(TRAIN_MESH)
  return preflight.resolve(c, c.mesh.data * c.mesh.fsdp * c.mesh.tensor)[0]


def _save(mgr, config: ml_collections.ConfigDict, step: int, state) -> Any:
  """Checkpoint `step` of `state` (finished before it returns); the host params."""
  checkpoint.save(mgr, step, state, None, config, force=True)
  mgr.wait_until_finished()
  return jax.device_get(state.params)


def _random_state(setup: step_lib.Setup, seed: int) -> step_lib.TrainState:
  """A train state on the setup's mesh: random parameters (std 0.02), zero optimizer state and step.
  Placed from the host: nothing compiles (a jitted init or train step costs ~5-15 s per objective)."""
  rng = np.random.default_rng(seed)
  put = lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding)
  abstract = setup.abstract_state
  zeros = jax.tree.map(lambda a: put(np.zeros(a.shape), a), abstract)
  return zeros.replace(params=jax.tree.map(lambda a: put(0.02 * rng.standard_normal(a.shape), a), abstract.params))


def _run(path, objective: str, steps: int) -> tuple[ml_collections.ConfigDict, list]:
  """A run on the training mesh: `steps` checkpoints (steps 1..steps), each of other random parameters.
  No train step: loading is what is tested, and a compile of the sharded step costs ~50 s here."""
  config = _config(objective)
  setup = step_lib.build(config, make_mesh(config.mesh))
  mgr = checkpoint.manager(str(path / "checkpoints"), config.checkpoint)
  saved = [_save(mgr, config, i + 1, _random_state(setup, seed=10 * len(objective) + i)) for i in range(steps)]
  mgr.close()
  return config, saved


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """objective -> (workdir, training config, host params of each saved step); gpt: 2 steps."""
  out = {}
  for objective in LOAD_ONTO:
    path = tmp_path_factory.mktemp(objective)
    config, saved = _run(path, objective, steps=2 if objective == "gpt" else 1)
    out[objective] = (path, config, saved)
  return out


def _no_optimizer(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("load_run built an optimizer / the train Setup")
  from nextlat_jax.train import optimizer
  monkeypatch.setattr(optimizer, "make_optimizer", refuse)
  monkeypatch.setattr(step_lib, "make_optimizer", refuse)
  monkeypatch.setattr(step_lib, "build", refuse)


@pytest.mark.parametrize("objective", list(LOAD_ONTO))
def test_params_equal_the_checkpoint_on_another_mesh(runs, objective, monkeypatch):
  path, train_config, saved = runs[objective]
  onto = LOAD_ONTO[objective]
  if isinstance(onto, tuple):
    onto = make_mesh(dict(zip(("data", "fsdp", "tensor"), onto)), jax.devices()[:4])
  _no_optimizer(monkeypatch)
  run = load_run(str(path), mesh=onto)
  monkeypatch.undo()
  assert run.step == len(saved) and run.workdir == str(path)
  assert_trees_equal(jax.device_get(run.params), saved[-1])
  want = {"gpt": (1, 4, 2), "nextlat": (1, 2, 2), "mtp": (8, 1, 1)}[objective]
  assert tuple(run.mesh.shape[a] for a in ("data", "fsdp", "tensor")) == want
  assert mesh_shape(run.config.mesh, run.mesh.devices.size) == want
  # the shardings training would use on this mesh, leaf for leaf
  expected = step_lib.build(run.config, run.mesh).state_shardings.params
  got = jax.tree.map(lambda x: x.sharding, run.params)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for g, e, x in zip(jax.tree.leaves(got), jax.tree.leaves(expected), jax.tree.leaves(run.params)):
    assert g.is_equivalent_to(e, x.ndim) and g.mesh.devices.size == run.mesh.devices.size
  assert jax.tree.leaves(run.param_shardings) == jax.tree.leaves(expected)
  # the rest of the Run: the objective and its modules, the trunk config, the ids and the tokenizer
  assert run.objective.name == objective and set(run.modules) == set(run.params)
  assert run.cfg.d_model == 32 and run.cfg.vocab_size == train_config.model.vocab_size
  info = pipeline.dataset_info(run.config.data)
  assert (run.eos_id, run.pad_id) == (info.eos_id, info.pad_id)
  assert run.tokenizer.decode(run.tokenizer.encode("3 17 N")) == ["3", "17", "N"]
  assert {k: v for k, v in run.config.model.items()} == {k: v for k, v in train_config.model.items()}


def test_a_chosen_step_and_config_overrides(runs):
  path, _, saved = runs["gpt"]
  run = load_run(str(path), step=1, overrides={"eval_steps": 3})
  assert run.step == 1 and run.config.eval_steps == 3
  assert_trees_equal(jax.device_get(run.params), saved[0])
  assert not np.array_equal(saved[0]["trunk"]["head"], saved[1]["trunk"]["head"])  # the steps differ


def test_a_missing_step_or_checkpoint_is_one_line(runs, tmp_path):
  path, _, _ = runs["gpt"]
  with pytest.raises(checkpoint.CheckpointMissing, match=r"no checkpoint of step 7 .*saved steps: 1, 2") as e:
    load_run(str(path), step=7)
  assert "\n" not in str(e.value)
  with pytest.raises(checkpoint.CheckpointMissing, match="no checkpoints folder"):
    load_run(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="unknown axes"):
    load_run(str(path), mesh={"model": 2})


def test_a_batch_that_does_not_split_over_the_devices_reads_on_fewer(runs, caplog):
  """A run whose batch (here 12, as if trained on 4 or 6 devices) does not split over the 8 devices here
  is read on the largest number of them that it splits over (6), with a warning, not refused."""
  path, _, saved = runs["gpt"]
  with caplog.at_level("WARNING", logger="nextlat_jax"):
    run = load_run(str(path), overrides={"batch_size": 12})
  assert tuple(run.mesh.shape[a] for a in ("data", "fsdp", "tensor")) == (6, 1, 1)
  assert "on 6 of 8 devices: its batch_size=12" in caplog.text
  assert_trees_equal(jax.device_get(run.params), saved[-1])
  from nextlat_jax.train.evaluate import evaluate_loaded
  result = evaluate_loaded(run, eval_steps=1)  # held-out batches of 12 rows, 2 per device
  assert result["step"] == 2 and np.isfinite(result["eval_ce"]) and result["eval_ce"] > 0

