"""The trainer's two performance options: a `jax.profiler` trace of chosen steps (`train.profile`) and
the persistent XLA compilation cache (`train.compilation_cache_dir`); their checks (`validate`, run by
config.validate)."""
from __future__ import annotations

import glob
import logging
import os
from typing import Any

import jax

from nextlat_jax.errors import need

log = logging.getLogger(__name__)


def validate(config: Any) -> None:
  """config.train.profile (the cache folder is typed by its placeholder); raises ConfigError for the first
  bad value."""
  p = config.train.profile
  need(int(p.start_step) >= -1, "train.profile.start_step", p.start_step, "must be -1 (off) or a step >= 0")
  need(int(p.start_step) < int(config.steps), "train.profile.start_step", p.start_step,
       f"must be < steps={config.steps} (the updates are 0 .. steps - 1)")
  need(int(p.steps) >= 1, "train.profile.steps", p.steps, "must be >= 1")


def use_compilation_cache(path: str | None) -> None:
  """Turns on the persistent compilation cache in `path` (None or '': leaves it as it is), caching every
  executable whatever its compile time or size. Takes effect only before the process's first compile:
  JAX decides once whether the cache is used."""
  if not path:
    return
  path = os.path.abspath(os.path.expanduser(path))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # default 1 s: tiny steps too
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size threshold, no override
  log.info("persistent compilation cache: %s", path)


class StepProfiler:
  """A `jax.profiler` trace of the updates start_step .. start_step + steps - 1 (0-based, as the state's
  step before each update; the window is cut at the run's last step). `before(s, state)` opens it at the
  window's first step the run reaches, once the device has finished the previous steps; `after(s,
  outputs)` closes it after the window's last step once that step's outputs are ready, so the trace holds
  exactly those steps (their data reads included). Each process writes its own trace: under
  <workdir>/profile, or <workdir>/profile/process_<i> when there are several (jax's file names are the
  host's, which local processes share). `close()` ends a trace cut short by a stop or an error."""

  def __init__(self, profile: Any, workdir: str, first_step: int, last_step: int):
    self.start = int(profile.start_step)
    self.end = min(self.start + int(profile.steps), last_step) if self.start >= 0 else -1
    self.dir = os.path.join(workdir, "profile")
    if jax.process_count() > 1:
      self.dir = os.path.join(self.dir, f"process_{jax.process_index()}")
    self.active = False
    if 0 <= self.start and self.end <= first_step:
      log.warning("train.profile: steps %d..%d are before this run's first step %d: not profiled",
                  self.start, self.end - 1, first_step)

  def before(self, step: int, state: Any) -> None:
    if not self.active and self.start <= step < self.end:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.dir)
      self.active, self.first = True, step

  def after(self, step: int, outputs: Any) -> None:
    if self.active and step + 1 == self.end:
      jax.block_until_ready(outputs)
      self._stop(step)

  def close(self, step: int) -> None:
    if self.active:
      self._stop(step - 1, cut=True)

  def _stop(self, last: int, cut: bool = False) -> None:
    jax.profiler.stop_trace()
    self.active = False
    sessions = sorted(glob.glob(os.path.join(self.dir, "plugins", "profile", "*")), key=os.path.getmtime)
    log.info("profile of steps %d..%d%s written to %s (TensorBoard's profile plugin / xprof: --logdir %s)",
             self.first, last, " (cut short)" if cut else "", sessions[-1] if sessions else self.dir, self.dir)
