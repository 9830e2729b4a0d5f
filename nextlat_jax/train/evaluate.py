"""`nextlat eval`: restore the parameters of a run (no optimizer state) on this machine's mesh and
evaluate them on the held-out split."""
from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from nextlat_jax.data import pipeline
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import checkpoint, trainer
from nextlat_jax.train import step as step_lib

log = logging.getLogger(__name__)


def run_config(workdir: str, step: int | None = None, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with, re-meshed for the devices here (all on `data`)."""
  config = ml_collections.ConfigDict(checkpoint.saved_config(os.path.join(workdir, "checkpoints"), step))
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  for key, value in (overrides or {}).items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def evaluate_run(workdir: str, step: int | None = None, eval_steps: int | None = None,
                 mesh_overrides: dict | None = None) -> dict:
  """Held-out metrics of a run's checkpoint; also written to DIR/eval_<step>.json."""
  config = run_config(workdir, step, {f"mesh.{k}": v for k, v in (mesh_overrides or {}).items()})
  if eval_steps:
    config.eval_steps = eval_steps
  config, _ = trainer.resolve(config)
  setup = step_lib.build(config, make_mesh(config.mesh))
  params, step = checkpoint.restore_params(os.path.join(workdir, "checkpoints"),
                                           setup.abstract_state.params, step)
  eval_ds = pipeline.make_dataset(config.data, split="eval", global_batch_size=int(config.batch_size),
                                  seed=int(config.seed), process_index=jax.process_index(),
                                  process_count=jax.process_count())
  metrics = trainer.evaluate(setup, params, eval_ds, int(config.eval_steps), jax.random.PRNGKey(config.seed))
  result = {"step": step, **metrics}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
      json.dump(result, f, indent=2)
  log.info("evaluated step %d of %s: %s", step, workdir, result)
  return result
