"""How a run stops early: stop requests (SIGTERM, Ctrl-C) and the exceptions that end a run on purpose.

SIGTERM (preemption) and Ctrl-C save at the next step boundary, then the run exits.

SIGTERM exits 0 after the save (a scheduler's requeue); the first Ctrl-C exits 130 after the save
(`Interrupted`); a second Ctrl-C aborts at once without saving (KeyboardInterrupt). Multi-process runs
agree on the step through JAX's preemption sync point (set up by `jax.distributed.initialize`, which
owns SIGTERM there): a Ctrl-C is turned into a SIGTERM of this process so every process stops together.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
  """The run stopped on Ctrl-C after saving its state (the CLI exits 130)."""


class TrainingStopped(RuntimeError):
  """Training stopped on purpose or could not go on (non-finite loss with nan_guard='stop', data ran
  out, a checkpoint save failed); one-line message."""


class NonFiniteStop(TrainingStopped):
  """A non-finite loss or gradient with nan_guard='stop': nothing is saved (the last checkpoint stands)."""


class StopRequests:
  """Installs the handlers (main thread only) for the duration of a `with` block."""

  def __init__(self) -> None:
    self.signal: int | None = None
    self._multi = jax.process_count() > 1
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
      if not self._multi:
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.signal = self.signal or signal.SIGTERM

  def _on_sigint(self, signum, frame) -> None:
    del signum, frame
    if self.signal == signal.SIGINT:  # the second Ctrl-C
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self.signal = signal.SIGINT
    log.warning("Ctrl-C: saving at the end of this step, then exiting (Ctrl-C again aborts without saving)")
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether the run should save and stop after `step` (a collective in multi-process runs)."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None

  @property
  def interrupted(self) -> bool:
    return self.signal == signal.SIGINT
