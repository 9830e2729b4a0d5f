"""The training loop: build the step for the run's mesh, compile it ahead of time, then step, log,
evaluate and save until `steps`, a stop request or an error (which saves the last good state).

What is checked before compiling is in preflight.py, where a run starts (resume, restore_from, fresh) in
resume.py, stop requests in interrupts.py, step timing in step_clock.py, the profiler trace and the
compilation cache in profiling.py. Metrics of a logged step are read only after the next step has been
dispatched, so the host never stalls the device.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from tqdm.contrib.logging import logging_redirect_tqdm

from nextlat_jax.data import pipeline
from nextlat_jax.parallel import canary
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import checkpoint, interrupts, mfu, preflight, profiling, resume, sizes
from nextlat_jax.train import step as step_lib
from nextlat_jax.train.evaluate import heldout_metrics
from nextlat_jax.train.metrics_writer import MetricsWriter
from nextlat_jax.train.step_clock import StepClock

log = logging.getLogger(__name__)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the last logged metrics.

  Everything that can refuse the run (config, workdir, data, the checkpoints found, the sharding canary)
  runs before anything is written or compiled.
  """
  config, info = preflight.resolve(config)
  preflight.check_workdir(workdir)
  preflight.check_restore_from(config)
  profiling.use_compilation_cache(config.train.compilation_cache_dir)  # before anything compiles
  is_main = jax.process_index() == 0
  mesh = make_mesh(config.mesh)
  setup = step_lib.build(config, mesh)
  B, L = int(config.batch_size), info.row_len
  train_ds, eval_ds, data_kw = preflight.open_data(config, info, setup.batch_sharding)
  data_iter = pipeline.BatchIterator(train_ds, 0, data_kw)
  rng = jax.random.PRNGKey(int(config.seed))
  state = resume.initial_state(setup, config, workdir, data_iter, rng)
  start = int(jax.device_get(state.step))
  if data_iter.step != start:  # fresh run, new process layout, or restore_from: the step decides
    data_iter.seek(start)
  if start >= int(config.steps):
    log.warning("the run is at step %d >= steps=%d: nothing to train", start, config.steps)
    return {}
  canary_error = canary.startup_check(config, mesh, L)

  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  log.info("mesh %s; objective %s; parameters %s", dict(mesh.shape), config.objective.name,
           {k: sizes.param_count(v) for k, v in setup.abstract_state.params.items()})
  compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(B, L, info.extra_fields),
                              setup.abstract_rng()).compile()
  memory = sizes.step_memory(compiled)
  log.info("per-device memory of the train step (MiB): %s", memory)
  every = int(config.checkpoint.every)
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), config.checkpoint) if every else None
  writer = MetricsWriter(workdir, enabled=is_main, total_steps=int(config.steps), initial_step=start)
  writer.write_static(step=start, memory=memory, session=dict(start_step=start, time=time.time(),
                                                              sharding_canary_error=canary_error))
  # Multi-process saves stay on the main thread: Orbax's cross-process barriers must run in the same
  # order relative to the training collectives on every process.
  background = bool(config.checkpoint.snapshot_on_device) and jax.process_count() == 1
  saver = mgr and checkpoint.BackgroundSaver(mgr, background)
  profiler = profiling.StepProfiler(config.train.profile, workdir, start, int(config.steps))
  loop = _Loop(config, setup, compiled, state, start, data_iter, eval_ds, writer, saver, rng, L, profiler)
  with interrupts.StopRequests() as stops, logging_redirect_tqdm(loggers=[logging.getLogger("nextlat_jax")]):
    try:
      loop.run(stops)
    except (KeyboardInterrupt, interrupts.NonFiniteStop):
      raise  # a second Ctrl-C aborts now; a NaN stop keeps the last checkpoint
    except Exception as e:
      loop.save_after_error(e)
      raise
    finally:
      try:
        profiler.close(loop.step)
        if saver:
          saver.close()
      finally:
        writer.close()
    if stops.interrupted:
      raise interrupts.Interrupted(f"interrupted (Ctrl-C) after step {loop.step}; "
                                   + (f"saved step {loop.saved}" if mgr else "checkpoint.every=0: nothing saved")
                                   + "; the same command resumes")
  return loop.clock.last


class _Loop:
  """The step loop's state: the train state and its step, the last saved step, pending metrics."""

  def __init__(self, config, setup, compiled, state, start, data_iter, eval_ds, writer, saver, rng, row_len,
               profiler):
    self.config, self.setup, self.compiled, self.state = config, setup, compiled, state
    self.step = self.saved = start
    self.data_iter, self.eval_ds, self.writer, self.saver, self.rng = data_iter, eval_ds, writer, saver, rng
    self.config_dict = json.loads(config.to_json())
    peak = mfu.peak_flops_per_device(config)
    self.clock = StepClock(writer, tokens_per_step=int(config.batch_size) * (row_len - 1), step=start,
                            flops_per_step=mfu.step_flops(config, row_len),
                            peak_flops=peak * jax.device_count() if peak else None)
    self.pending: tuple | None = None
    self.profiler = profiler

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
      self.profiler.before(s, self.state)
      try:
        local = next(self.data_iter)
      except StopIteration:
        raise interrupts.TrainingStopped(f"the train data ran out after step {s} (a stream shorter than steps="
                              f"{c.steps} x batch_size={c.batch_size} rows)") from None
      self.state, metrics = self.compiled(self.state, step_lib.global_batch(local, self.setup.batch_sharding), self.rng)
      self.profiler.after(s, (self.state, metrics))
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
          self.writer.write(done, heldout_metrics(self.setup.eval, self.setup.batch_sharding, self.state.params,
                                                  self.eval_ds, int(c.eval_steps), self.rng))
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
