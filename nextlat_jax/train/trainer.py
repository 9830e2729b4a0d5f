"""The training loop: resolve and validate the config, compile ahead of time, step, log, evaluate.

Metrics of a logged step are read only after the next step has been dispatched, so the host never
stalls the device.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import grain
import jax
import ml_collections
from jax.experimental import multihost_utils

from nextlat_jax import config as config_lib
from nextlat_jax.data import pipeline
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import checkpoint, mfu
from nextlat_jax.train import step as step_lib
from nextlat_jax.train.metrics_writer import MetricsWriter

log = logging.getLogger(__name__)


def resolve(config: ml_collections.ConfigDict, num_devices: int | None = None
            ) -> tuple[ml_collections.ConfigDict, pipeline.DatasetInfo]:
  """Fills dataset-derived values (vocab size, EOS id) and validates for `num_devices` (default: all
  devices); returns a locked copy."""
  config = ml_collections.ConfigDict(config.to_dict())
  try:
    info = pipeline.dataset_info(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError("data", config.data.get("name"), str(e)) from None
  with config.unlocked():
    if not config.model.vocab_size:
      config.model.vocab_size = info.vocab_size
    config.data.eos_id = info.eos_id
  config_lib.validate(config, jax.device_count() if num_devices is None else num_devices,
                      data_vocab=info.vocab_size)
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
  log.info("per-device memory of the train step: %s", out)
  return out


def evaluate(setup: step_lib.Setup, params: Any, eval_ds: grain.MapDataset, steps: int, rng: jax.Array) -> dict:
  """Mean of the objective's metrics over the first `steps` held-out batches (the same each time)."""
  sums: dict[str, float] = {}
  outs = [setup.eval(params, step_lib.global_batch(eval_ds[i], setup.batch_sharding), rng)
          for i in range(steps)]
  for m in jax.device_get(outs):
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {f"eval_{k}": v / steps for k, v in sums.items()}


class TrainingStopped(RuntimeError):
  """Training stopped on purpose (e.g. a non-finite loss with nan_guard='stop'); one-line message."""


class Preemption:
  """SIGTERM -> save at the next step boundary. Multi-process runs agree on the step through JAX's
  preemption sync point (set up by `jax.distributed.initialize`)."""

  def __init__(self) -> None:
    self.requested = False
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def _initial_state(setup: step_lib.Setup, config: ml_collections.ConfigDict, mgr: Any,
                   data_iter: pipeline.BatchIterator, rng: jax.Array) -> step_lib.TrainState:
  """The newest valid checkpoint of this run, else checkpoint.restore_from, else a fresh init."""
  if mgr is not None and mgr.all_steps():
    state = checkpoint.restore_latest(mgr, setup.abstract_state, data_iter)
    if state is not None:
      return state
    log.warning("no readable checkpoint in %s; starting fresh", mgr.directory)
  source = config.checkpoint.get("restore_from")
  if source:
    src_dir, step = checkpoint.resolve_path(source)
    src = checkpoint.manager(src_dir, config.checkpoint, read_only=True)
    state = checkpoint.restore_step(src, step, setup.abstract_state)
    log.info("started from %s step %s", src_dir, "latest" if step is None else step)
    return state
  return setup.init(rng)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the last logged metrics."""
  config, info = resolve(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))

  mesh = make_mesh(config.mesh)
  setup = step_lib.build(config, mesh)
  log.info("mesh %s; objective %s; parameters %s", dict(mesh.shape), config.objective.name,
               {k: param_count(v) for k, v in setup.abstract_state.params.items()})
  B, L = int(config.batch_size), info.row_len
  compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(B, L, info.extra_fields), setup.abstract_rng()).compile()
  memory = log_memory(compiled)

  data_kw = dict(global_batch_size=B, seed=int(config.seed), process_index=jax.process_index(),
                 process_count=jax.process_count())
  eval_ds = pipeline.make_dataset(config.data, split="eval", **data_kw) if config.eval_every else None
  if eval_ds is not None and len(eval_ds) < config.eval_steps:
    raise config_lib.ConfigError("eval_steps", config.eval_steps,
                                 f"the eval split has only {len(eval_ds)} batches of {B} rows")
  data_iter = pipeline.BatchIterator(pipeline.make_dataset(config.data, split="train", **data_kw), 0, data_kw)
  every = int(config.checkpoint.every)
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), config.checkpoint) if every else None

  rng = jax.random.PRNGKey(int(config.seed))
  state = _initial_state(setup, config, mgr, data_iter, rng)
  start = int(jax.device_get(state.step))
  if data_iter.step != start:  # fresh run, new process layout, or restore_from: the step decides
    data_iter.seek(start)

  writer = MetricsWriter(workdir, enabled=is_main, total_steps=int(config.steps), initial_step=start)
  writer.write_static(step=start, memory=memory)
  peak = mfu.peak_flops_per_device(config)
  clock = _StepClock(writer, tokens_per_step=B * (L - 1), step=start, flops_per_step=mfu.step_flops(config, L),
                     peak_flops=peak * jax.device_count() if peak else None)
  preemption, guard = Preemption(), config.nan_guard
  pending, saved = None, start
  config_dict = json.loads(config.to_json())
  # Multi-process saves stay on the main thread: Orbax's cross-process barriers must run in the same
  # order relative to the training collectives on every process.
  background = bool(config.checkpoint.snapshot_on_device) and jax.process_count() == 1
  saver = mgr and checkpoint.BackgroundSaver(mgr, background)

  def save(step: int, force: bool = False) -> int:
    if mgr is None or step == saved:
      return saved
    with clock.paused():
      saver.save(step, state, data_iter, config_dict, force=force)
    return step

  try:
    for s in range(start, int(config.steps)):
      state, metrics = compiled(state, step_lib.global_batch(next(data_iter), setup.batch_sharding), rng)
      if pending is not None:  # read step s-1's metrics now that step s is queued
        clock.read(*pending, guard=guard)
      done = s + 1
      pending = (done, metrics, done % config.log_every == 0 or done == config.steps)
      if pending[2] and (data_stats := data_iter.stats()):  # a stream's documents, skipped, invalid UTF-8
        writer.write(done, {f"data_{k}": float(v) for k, v in data_stats.items()})
      if eval_ds is not None and (done % config.eval_every == 0 or done == config.steps):
        clock.read(*pending, guard=guard)
        pending = None
        with clock.paused():
          writer.write(done, evaluate(setup, state.params, eval_ds, int(config.eval_steps), rng))
      if every and done % every == 0:
        saved = save(done)
      writer.advance(done)
      if preemption.reached(done):
        if pending is not None:
          clock.read(*pending, guard=guard)
          pending = None
        log.warning("preempted: saving step %d and exiting", done)
        saved = save(done, force=True)
        break
    else:
      if pending is not None:
        clock.read(*pending, guard=guard)
      saved = save(int(config.steps), force=True)
  finally:
    if saver:
      saver.close()
    writer.close()
  return clock.last


class _StepClock:
  """Logs step metrics with the wall time per step since the previous log, evaluation excluded."""

  def __init__(self, writer: MetricsWriter, tokens_per_step: int, step: int, flops_per_step: float,
               peak_flops: float | None):
    self.writer, self.tokens_per_step = writer, tokens_per_step
    self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
    self.t, self.step, self.last = time.perf_counter(), step, {}

  def read(self, step: int, metrics: dict, write: bool, guard: str) -> None:
    """Reads a step's metrics: acts on a non-finite loss, writes them if it is a logged step."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not scalars.pop("finite"):
      if guard == "stop":
        raise TrainingStopped(f"non-finite loss or gradient at step {step} (nan_guard='stop'); "
                              "its update was not applied and no checkpoint holds it")
      log.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", step,
                      int(scalars["nonfinite_steps"]))
    if not write:
      return
    now = time.perf_counter()
    step_time = (now - self.t) / max(step - self.step, 1)
    scalars.update(step_time_s=step_time, tokens_per_sec=self.tokens_per_step / step_time,
                   model_flops_per_sec=self.flops_per_step / step_time)
    if self.peak_flops:
      scalars["mfu"] = self.flops_per_step / step_time / self.peak_flops
    self.writer.write(step, scalars)
    self.t, self.step, self.last = now, step, dict(scalars, step=step)

  @contextlib.contextmanager
  def paused(self):
    t0 = time.perf_counter()
    yield
    self.t += time.perf_counter() - t0
