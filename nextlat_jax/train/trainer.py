"""The training loop: resolve and validate the config, compile ahead of time, step, log, evaluate.

Metrics of a logged step are read only after the next step has been dispatched, so the host never
stalls the device.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from nextlat_jax import config as config_lib
from nextlat_jax.data import pipeline
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import step as step_lib
from nextlat_jax.train.metrics_writer import MetricsWriter


def resolve(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, pipeline.DatasetInfo]:
  """Fills dataset-derived values (vocab size, EOS id) and validates; returns a locked copy."""
  config = ml_collections.ConfigDict(config.to_dict())
  try:
    info = pipeline.dataset_info(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError("data", config.data.get("name"), str(e)) from None
  with config.unlocked():
    if not config.model.vocab_size:
      config.model.vocab_size = info.vocab_size
    config.data.eos_id = info.eos_id
  config_lib.validate(config, jax.device_count(), data_vocab=info.vocab_size)
  config.lock()
  return config, info


def param_count(tree: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def log_memory(compiled: Any) -> dict:
  """Per-device memory of a compiled step, as XLA reports it."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  mib = lambda b: round(b / 2**20, 2)
  out = {"argument_mib": mib(stats.argument_size_in_bytes), "output_mib": mib(stats.output_size_in_bytes),
         "temp_mib": mib(stats.temp_size_in_bytes), "alias_mib": mib(stats.alias_size_in_bytes)}
  out["total_mib"] = round(out["argument_mib"] + out["output_mib"] + out["temp_mib"] - out["alias_mib"], 2)
  logging.info("per-device memory of the train step: %s", out)
  return out


def _batches(ds: grain.MapDataset, start: int) -> Iterator[dict]:
  return iter(ds[start:].to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def evaluate(setup: step_lib.Setup, params: Any, eval_ds: grain.MapDataset, steps: int, rng: jax.Array) -> dict:
  """Mean of the objective's metrics over the first `steps` held-out batches (the same each time)."""
  sums: dict[str, float] = {}
  outs = [setup.eval(params, step_lib.global_batch(eval_ds[i], setup.batch_sharding), rng)
          for i in range(steps)]
  for m in jax.device_get(outs):
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {f"eval_{k}": v / steps for k, v in sums.items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`; returns the last logged metrics."""
  config, info = resolve(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))

  mesh = make_mesh(config.mesh)
  setup = step_lib.build(config, mesh)
  logging.info("mesh %s; objective %s; parameters %s", dict(mesh.shape), config.objective.name,
               {k: param_count(v) for k, v in setup.abstract_state.params.items()})
  B, L = int(config.batch_size), info.row_len
  compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(B, L), setup.abstract_rng()).compile()
  memory = log_memory(compiled)

  rng = jax.random.PRNGKey(int(config.seed))
  state = setup.init(rng)
  start = int(jax.device_get(state.step))
  data_kw = dict(global_batch_size=B, seed=int(config.seed), process_index=jax.process_index(),
                 process_count=jax.process_count())
  train_batches = _batches(pipeline.make_dataset(config.data, split="train", **data_kw), start)
  eval_ds = pipeline.make_dataset(config.data, split="eval", **data_kw) if config.eval_every else None
  if eval_ds is not None and len(eval_ds) < config.eval_steps:
    raise config_lib.ConfigError("eval_steps", config.eval_steps,
                                 f"the eval split has only {len(eval_ds)} batches of {B} rows")

  writer = MetricsWriter(workdir, enabled=is_main, total_steps=int(config.steps), initial_step=start)
  writer.write_static(step=start, memory=memory)
  clock = _StepClock(writer, tokens_per_step=B * (L - 1), step=start)
  pending = None
  for s in range(start, int(config.steps)):
    batch = step_lib.global_batch(next(train_batches), setup.batch_sharding)
    state, metrics = compiled(state, batch, rng)
    if pending is not None:  # read step s-1's metrics now that step s is queued
      clock.log(*pending)
      pending = None
    done = s + 1
    if done % config.log_every == 0 or done == config.steps:
      pending = (done, metrics)
    if eval_ds is not None and (done % config.eval_every == 0 or done == config.steps):
      if pending is not None:
        clock.log(*pending)
        pending = None
      with clock.paused():
        writer.write(done, evaluate(setup, state.params, eval_ds, int(config.eval_steps), rng))
    writer.advance(done)
  if pending is not None:
    clock.log(*pending)
  writer.close()
  return clock.last


class _StepClock:
  """Logs step metrics with the wall time per step since the previous log, evaluation excluded."""

  def __init__(self, writer: MetricsWriter, tokens_per_step: int, step: int):
    self.writer, self.tokens_per_step = writer, tokens_per_step
    self.t, self.step, self.last = time.perf_counter(), step, {}

  def log(self, step: int, metrics: dict) -> None:
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    step_time = (now - self.t) / max(step - self.step, 1)
    scalars.update(step_time_s=step_time, tokens_per_sec=self.tokens_per_step / step_time)
    self.writer.write(step, scalars)
    self.t, self.step, self.last = now, step, dict(scalars, step=step)

  @contextlib.contextmanager
  def paused(self):
    t0 = time.perf_counter()
    yield
    self.t += time.perf_counter() - t0
