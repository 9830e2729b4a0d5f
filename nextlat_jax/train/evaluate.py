"""Held-out loss: the mean of the objective's metrics over the first held-out batches, during training
and for `nextlat eval` (a finished run's parameters, no optimizer state, loaded onto this machine's mesh
by nextlat_jax.run.load_run)."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Any, Callable

import grain
import jax

from nextlat_jax.data import pipeline
from nextlat_jax.parallel import sharding
from nextlat_jax.run import Run, load_run
from nextlat_jax.train import step as step_lib

log = logging.getLogger(__name__)


def heldout_metrics(eval_fn: Any, batch_sharding: Any, params: Any, eval_ds: grain.MapDataset, steps: int,
                    rng: jax.Array) -> dict:
  """Mean of the metrics of `eval_fn` (params, batch, rng) -> metrics (e.g. Setup.eval) over the first
  `steps` held-out batches (the same each time), placed by `batch_sharding`."""
  sums: dict[str, float] = {}
  outs = [eval_fn(params, step_lib.global_batch(eval_ds[i], batch_sharding), rng) for i in range(steps)]
  for m in jax.device_get(outs):
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {f"eval_{k}": v / steps for k, v in sums.items()}


def eval_fn(run: Run) -> Callable[..., dict]:
  """Jitted (params, batch, rng) -> the objective's metrics, sharded like the run (no optimizer)."""
  rep = sharding.replicated(run.mesh)
  return jax.jit(functools.partial(step_lib.eval_step, objective=run.objective),
                 in_shardings=(run.param_shardings, run.batch_sharding, rep), out_shardings=rep)


def evaluate_loaded(run: Run, eval_steps: int | None = None) -> dict:
  """Held-out metrics of a loaded run (nextlat_jax.run.load_run) over its first `eval_steps` held-out
  batches (default: the run's eval_steps), with eval_perplexity = exp(eval_ce); also written to
  DIR/eval_<step>.json."""
  config = run.config
  steps = int(eval_steps or config.eval_steps)
  eval_ds = pipeline.make_dataset(config.data, split="eval", global_batch_size=int(config.batch_size),
                                  seed=int(config.seed), process_index=jax.process_index(),
                                  process_count=jax.process_count())
  metrics = heldout_metrics(eval_fn(run), run.batch_sharding, run.params, eval_ds, steps,
                            jax.random.PRNGKey(config.seed))
  if "eval_ce" in metrics:
    metrics["eval_perplexity"] = math.exp(min(metrics["eval_ce"], 700.0))  # exp overflows past ~709
  result = {"step": run.step, **metrics}
  if jax.process_index() == 0:
    with open(os.path.join(run.workdir, f"eval_{run.step}.json"), "w") as f:
      json.dump(result, f, indent=2)
  log.info("evaluated step %d of %s: %s", run.step, run.workdir, result)
  return result


def evaluate_run(workdir: str, step: int | None = None, eval_steps: int | None = None,
                 mesh_overrides: dict | None = None) -> dict:
  """Held-out metrics of a run's checkpoint (loaded here; evaluate_loaded for a loaded run)."""
  return evaluate_loaded(load_run(workdir, step, mesh_overrides), eval_steps)
