"""Step timing and reading a step's metrics: wall time per step since the previous log (evaluation and
saves excluded), tokens/s, model FLOP/s and MFU, and the NaN guard's decision on a non-finite step."""
from __future__ import annotations

import contextlib
import logging
import time

import jax

from nextlat_jax.train.interrupts import NonFiniteStop
from nextlat_jax.train.metrics_writer import MetricsWriter

log = logging.getLogger(__name__)


class StepClock:
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
