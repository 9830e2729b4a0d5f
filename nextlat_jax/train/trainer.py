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
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
from tqdm.contrib.logging import logging_redirect_tqdm

from nextlat_jax import config as config_lib
from nextlat_jax.data import pipeline
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import checkpoint, interrupts, mfu, resume
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
  """Training stopped on purpose or could not go on (non-finite loss with nan_guard='stop', data ran
  out, a checkpoint save failed); one-line message."""


class NonFiniteStop(TrainingStopped):
  """A non-finite loss or gradient with nan_guard='stop': nothing is saved (the last checkpoint stands)."""


def check_workdir(workdir: str) -> None:
  """ConfigError unless `workdir` is (or can be made) a writable directory; creates nothing."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise config_lib.ConfigError("workdir", workdir, "exists and is not a directory")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise config_lib.ConfigError("workdir", workdir, f"{parent} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
    raise config_lib.ConfigError("workdir", workdir, f"{parent} is not writable")


def open_data(config: ml_collections.ConfigDict, info: pipeline.DatasetInfo, batch_sharding: Any
              ) -> tuple[Any, Any, dict]:
  """The train and eval datasets of this process, checked against the run before anything compiles:
  enough train batches for `steps`, enough eval batches, rows where this process's shards need them."""
  B = int(config.batch_size)
  data_kw = dict(global_batch_size=B, seed=int(config.seed), process_index=jax.process_index(),
                 process_count=jax.process_count())
  try:
    pipeline.check_process_rows(batch_sharding, B, info.row_len, jax.process_count())
  except ValueError as e:
    raise config_lib.ConfigError("mesh", {a: config.mesh[a] for a in ("data", "fsdp", "tensor")}, str(e)) from None
  try:
    train_ds = pipeline.make_dataset(config.data, split="train", **data_kw)
    eval_ds = pipeline.make_dataset(config.data, split="eval", **data_kw) if config.eval_every else None
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError("data", config.data.get("name"), str(e)) from None
  if isinstance(train_ds, grain.MapDataset):
    if len(train_ds) < int(config.steps):
      raise config_lib.ConfigError("steps", config.steps, f"the train data holds {len(train_ds) * B} rows = "
                                   f"{len(train_ds)} steps of batch_size={B}; lower steps or add data")
  else:
    log.info("the train data is a stream of unknown length; if it runs out, the run saves and stops")
  if eval_ds is not None and isinstance(eval_ds, grain.MapDataset) and len(eval_ds) < config.eval_steps:
    raise config_lib.ConfigError("eval_steps", config.eval_steps,
                                 f"the eval split has only {len(eval_ds)} batches of {B} rows")
  return train_ds, eval_ds, data_kw


def _initial_state(setup: step_lib.Setup, config: ml_collections.ConfigDict, workdir: str,
                   data_iter: pipeline.BatchIterator, rng: jax.Array) -> step_lib.TrainState:
  """This run's newest readable checkpoint (or a refusal), else checkpoint.restore_from, else a fresh init."""
  config_dict = json.loads(config.to_json())
  state = resume.resume(workdir, setup.abstract_state, data_iter, config_dict,
                        allow_fresh=bool(config.checkpoint.allow_fresh_start))
  if state is not None:
    return state
  source = config.checkpoint.restore_from
  if source:
    src_dir, step = checkpoint.resolve_path(source)
    src = checkpoint.manager(src_dir, config.checkpoint, read_only=True)
    step = src.latest_step() if step is None else step
    if step is None:
      raise checkpoint.CheckpointMissing(src_dir, f"checkpoint.restore_from={source}: no checkpoint in {src_dir}")
    if resume.check_compatible(src, step, setup.abstract_state, config_dict, workdir, warm_start=True):
      state = checkpoint.restore_step(src, step, setup.abstract_state)
      log.info("started from %s step %s (parameters and optimizer state)", src_dir, step)
      return state
    params, _ = checkpoint.restore_params(src_dir, setup.abstract_state.params, step)
    log.warning("started from the parameters of %s step %s; the optimizer state there does not fit this "
                "config, so it starts fresh at step 0", src_dir, step)
    return setup.init(rng).replace(params=params)
  return setup.init(rng)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the last logged metrics.

  Everything that can refuse the run (config, workdir, data, the checkpoints found, the sharding canary)
  runs before anything is written or compiled.
  """
  config, info = resolve(config)
  check_workdir(workdir)
  is_main = jax.process_index() == 0
  mesh = make_mesh(config.mesh)
  setup = step_lib.build(config, mesh)
  B, L = int(config.batch_size), info.row_len
  train_ds, eval_ds, data_kw = open_data(config, info, setup.batch_sharding)
  data_iter = pipeline.BatchIterator(train_ds, 0, data_kw)
  rng = jax.random.PRNGKey(int(config.seed))
  state = _initial_state(setup, config, workdir, data_iter, rng)
  start = int(jax.device_get(state.step))
  if data_iter.step != start:  # fresh run, new process layout, or restore_from: the step decides
    data_iter.seek(start)
  if start >= int(config.steps):
    log.warning("the run is at step %d >= steps=%d: nothing to train", start, config.steps)
    return {}
  canary_error = _sharding_canary(config, mesh, L)

  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  log.info("mesh %s; objective %s; parameters %s", dict(mesh.shape), config.objective.name,
           {k: param_count(v) for k, v in setup.abstract_state.params.items()})
  compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(B, L, info.extra_fields),
                              setup.abstract_rng()).compile()
  memory = log_memory(compiled)
  every = int(config.checkpoint.every)
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), config.checkpoint) if every else None
  writer = MetricsWriter(workdir, enabled=is_main, total_steps=int(config.steps), initial_step=start)
  writer.write_static(step=start, memory=memory, session=dict(start_step=start, time=time.time(),
                                                              sharding_canary_error=canary_error))
  # Multi-process saves stay on the main thread: Orbax's cross-process barriers must run in the same
  # order relative to the training collectives on every process.
  background = bool(config.checkpoint.snapshot_on_device) and jax.process_count() == 1
  saver = mgr and checkpoint.BackgroundSaver(mgr, background)
  loop = _Loop(config, setup, compiled, state, start, data_iter, eval_ds, writer, saver, rng, L)
  with interrupts.StopRequests() as stops, logging_redirect_tqdm(loggers=[logging.getLogger("nextlat_jax")]):
    try:
      loop.run(stops)
    except (KeyboardInterrupt, NonFiniteStop):
      raise  # a second Ctrl-C aborts now; a NaN stop keeps the last checkpoint
    except Exception as e:
      loop.save_after_error(e)
      raise
    finally:
      try:
        if saver:
          saver.close()
      finally:
        writer.close()
    if stops.interrupted:
      raise interrupts.Interrupted(f"interrupted (Ctrl-C) after step {loop.step}; "
                                   + (f"saved step {loop.saved}" if mgr else "checkpoint.every=0: nothing saved")
                                   + "; the same command resumes")
  return loop.clock.last


def _sharding_canary(config: ml_collections.ConfigDict, mesh: Any, row_len: int) -> float | None:
  """The start-up check of sharded vs single-device gradients (parallel/canary.py); None if off."""
  if not config.train.sharding_canary or mesh.devices.size == 1:
    return None
  from nextlat_jax.parallel import canary
  t0 = time.perf_counter()
  error = canary.check(config, mesh, row_len)
  log.info("sharding canary on mesh %s: max gradient error %.2e relative to max|g| (%.1f s)",
           dict(mesh.shape), error, time.perf_counter() - t0)
  return error


class _Loop:
  """The step loop's state: the train state and its step, the last saved step, pending metrics."""

  def __init__(self, config, setup, compiled, state, start, data_iter, eval_ds, writer, saver, rng, row_len):
    self.config, self.setup, self.compiled, self.state = config, setup, compiled, state
    self.step = self.saved = start
    self.data_iter, self.eval_ds, self.writer, self.saver, self.rng = data_iter, eval_ds, writer, saver, rng
    self.config_dict = json.loads(config.to_json())
    peak = mfu.peak_flops_per_device(config)
    self.clock = _StepClock(writer, tokens_per_step=int(config.batch_size) * (row_len - 1), step=start,
                            flops_per_step=mfu.step_flops(config, row_len),
                            peak_flops=peak * jax.device_count() if peak else None)
    self.pending: tuple | None = None

  def save(self, force: bool = False, with_data: bool = True) -> None:
    if self.saver is None or self.step == self.saved:
      return
    with self.clock.paused():
      self.saver.save(self.step, self.state, self.data_iter if with_data else None, self.config_dict, force=force)
    self.saved = self.step

  def flush(self) -> None:
    if self.pending is not None:
      pending, self.pending = self.pending, None
      self.clock.read(*pending, guard=self.config.nan_guard)

  def run(self, stops: interrupts.StopRequests) -> None:
    c, every = self.config, int(self.config.checkpoint.every)
    for s in range(self.step, int(c.steps)):
      try:
        local = next(self.data_iter)
      except StopIteration:
        raise TrainingStopped(f"the train data ran out after step {s} (a stream shorter than steps="
                              f"{c.steps} x batch_size={c.batch_size} rows)") from None
      self.state, metrics = self.compiled(self.state, step_lib.global_batch(local, self.setup.batch_sharding), self.rng)
      self.step = done = s + 1
      if self.saver:
        self.saver.poll()
      if self.pending is not None:  # read step s-1's metrics now that step s is queued
        self.flush()
      self.pending = (done, metrics, done % c.log_every == 0 or done == c.steps)
      if self.pending[2] and (data_stats := self.data_iter.stats()):  # a stream's documents, skipped, ...
        self.writer.write(done, {f"data_{k}": float(v) for k, v in data_stats.items()})
      if self.eval_ds is not None and (done % c.eval_every == 0 or done == c.steps):
        self.flush()
        with self.clock.paused():
          self.writer.write(done, evaluate(self.setup, self.state.params, self.eval_ds, int(c.eval_steps), self.rng))
      if every and done % every == 0:
        self.save()
      self.writer.advance(done)
      if stops.reached(done):
        self.flush()
        log.warning("%s: saving step %d and exiting", "interrupted" if stops.interrupted else "preempted", done)
        self.save(force=True)
        return
    self.flush()
    self.save(force=True)

  def save_after_error(self, error: BaseException) -> None:
    """After an error in the loop: saves the last state if it is intact and finite, else says why not."""
    if self.saver is None or self.step == self.saved:
      return
    leaves = jax.tree.leaves(self.state)
    if any(x.is_deleted() for x in leaves):
      log.error("%s at step %d: the train state was consumed by the failed step; not saved (last checkpoint: "
                "step %d)", type(error).__name__, self.step, self.saved)
      return
    if not bool(jax.device_get(_all_finite(self.state.params))):
      log.error("%s at step %d: the parameters are not finite; not saved (last checkpoint: step %d)",
                type(error).__name__, self.step, self.saved)
      return
    log.warning("%s at step %d: saving the train state before stopping", type(error).__name__, self.step)
    # The data iterator is one batch ahead if the error came from the step itself: then save no data
    # position (the resumed run repositions index-addressable data from the step).
    self.save(force=True, with_data=self.data_iter.step == self.step)
    self.saver.wait()


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


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
        raise NonFiniteStop(f"non-finite loss or gradient at step {step} (nan_guard='stop'); "
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
