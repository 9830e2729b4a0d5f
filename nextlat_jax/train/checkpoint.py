"""Orbax checkpoints: one composite per saved step, visible only once complete; every save verified.

Items of a checkpoint:
  params     the parameters (restorable alone, onto any mesh, for evaluation)
  opt_state  {"step", "opt_state", "nonfinite"}: the rest of the train state
  data       each process's data-iterator state (grain's per-process handler); absent when the state
             was saved without a matching data position (then the step repositions the data)
  config     the resolved config as JSON
Restoring onto another mesh / device count passes abstract targets that carry the new shardings.
What a run does with the checkpoints it finds (resume, refuse, move aside) is `train/resume.py`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from nextlat_jax.config import ConfigError
from nextlat_jax.train.step import TrainState

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "data", "config")
# What reading a damaged checkpoint raises: tensorstore (ValueError), JSON (ValueError), a missing
# item (KeyError), the file system (OSError). A shape or tree mismatch never gets this far: resume.py
# compares the checkpoint's metadata with the run's state before restoring.
READ_ERRORS = (ValueError, KeyError, OSError)


class SaveError(RuntimeError):
  """A requested checkpoint save did not happen or did not complete; names the step."""


class CheckpointMissing(ConfigError):
  """No (readable) checkpoint where one is needed; one line naming the folder and the step."""

  def __init__(self, directory: str, why: str):
    super().__init__("workdir", os.path.dirname(os.path.abspath(directory)), why)


class _ReadOnlyNotice(logging.Filter):
  """Drops Orbax's read-only notices ("Given directory is read only=...", "... is read only, save / delete
  will be skipped"): a restore-only manager is read-only by design, so they are not news."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.pathname.replace(os.sep, "/").endswith("orbax/checkpoint/checkpoint_manager.py")
                and "read only" in str(record.msg))


_READ_ONLY_NOTICE = _ReadOnlyNotice()
logging.getLogger("absl").addFilter(_READ_ONLY_NOTICE)  # whatever absl's level (some scripts set INFO)


@contextlib.contextmanager
def _quiet_absl():
  """Orbax warns through absl on every read-only manager ("Given directory is read only"): not news."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def manager(directory: str, ckpt_cfg: Any, *, read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints plus every `keep_period`-th step for good; saves asynchronously.

  `read_only` opens existing checkpoints for reading (`ckpt_cfg` unused) and writes nothing."""
  if read_only:
    return _read_only(directory, ITEMS)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(ckpt_cfg.keep), keep_period=int(ckpt_cfg.keep_period) or None,
      enable_async_checkpointing=bool(ckpt_cfg.async_save))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=_handlers())


def rest_of_state(state: TrainState) -> dict:
  """The train state without its parameters."""
  return {"step": state.step, "opt_state": state.opt_state, "nonfinite": state.nonfinite}


def save(mgr: ocp.CheckpointManager, step: int, state: TrainState, data_iter: Any | None, config: Any, *,
         force: bool = False) -> None:
  """Starts an (asynchronous) save of `state`, which is at `step` (passed in: no device sync here).

  `config` is the resolved ConfigDict or its JSON-ready dict; `data_iter` None saves no data position.
  Raises SaveError if Orbax declines the save (it skips steps <= its newest without `force`).
  """
  config_dict = config if isinstance(config, dict) else json.loads(config.to_json())
  items = dict(params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(rest_of_state(state)),
               config=ocp.args.JsonSave(config_dict))
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  if not mgr.save(step, args=ocp.args.Composite(**items), force=force):
    raise SaveError(f"checkpoint save of step {step} was skipped by Orbax (its newest step is "
                    f"{mgr.latest_step()}; a step is saved once, after the newest)")


def verify_saved(mgr: ocp.CheckpointManager, step: int, items: tuple[str, ...] = ("params", "opt_state", "config")
                 ) -> None:
  """Raises SaveError unless `step` is a finished step folder holding `items` (after the save's wait)."""
  path = epath.Path(mgr.directory) / str(step)
  missing = [i for i in items if not (path / i).is_dir()]
  if not path.is_dir() or missing:
    raise SaveError(f"checkpoint save of step {step} did not complete: {path} "
                    + ("is missing" if not path.is_dir() else f"lacks {', '.join(missing)}"))


def check_readable(directory: Any, step: int, items: tuple[str, ...] = ("params", "opt_state")) -> None:
  """Reads the OCDBT index (manifest and b-tree) of each array item of `step`, one item at a time;
  raises one of READ_ERRORS (tensorstore's ValueError) if one is damaged.

  Orbax reads every array of an item at once and, when one read fails, closes its event loop with the
  others still in flight: they then print "RuntimeError: Event loop is closed" tracebacks. Checking the
  index first turns the common damage (a truncated, empty or garbled index) into one clean error."""
  import tensorstore as ts
  for item in items:
    path = epath.Path(directory) / str(step) / item
    if not (path / "manifest.ocdbt").exists():  # not an OCDBT item: Orbax's restore reports it
      continue
    base = str(path) if "://" in str(path) else f"file://{os.path.abspath(path)}"
    ts.KvStore.open({"driver": "ocdbt", "base": base + "/"}).result().list().result()


def restore_step(mgr: ocp.CheckpointManager, step: int | None, abstract_state: TrainState,
                 data_iter: Any | None = None) -> TrainState:
  """The full train state of `step` (None: the newest) onto the shardings of `abstract_state`."""
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointMissing(str(mgr.directory), f"no checkpoint in {mgr.directory}")
  check_readable(mgr.directory, step)
  items = {"params": ocp.args.StandardRestore(abstract_state.params),
           "opt_state": ocp.args.StandardRestore(rest_of_state(abstract_state))}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  out = mgr.restore(step, args=ocp.args.Composite(**items))
  rest = out["opt_state"]
  return TrainState(step=rest["step"], params=out["params"], opt_state=rest["opt_state"],
                    nonfinite=rest["nonfinite"])


def has_data_state(mgr: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` saved a data-iterator state for this (process index, count)."""
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  return (epath.Path(mgr.directory) / str(step) / "data" / name).exists()


class _FrozenDataState:
  """The data iterator's state at save time, for grain's handler (the live iterator moves on)."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


class BackgroundSaver:
  """Saves from a background thread, so the train loop blocks only to snapshot the state.

  With `snapshot_on_device` the state is first copied on device (one extra copy of the train state in
  device memory; the step after the save may donate the original), else the save waits for Orbax's
  own blocking part (the device-to-host transfer) in the background thread before the loop goes on.
  At most one save is in flight; a new save first waits for the previous one. Every save is verified
  (Orbax's answer, then the finished step folder); a failure raises SaveError naming the step.
  """

  def __init__(self, mgr: ocp.CheckpointManager, snapshot_on_device: bool = True):
    self.mgr, self.snapshot_on_device = mgr, snapshot_on_device
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
    self._future: concurrent.futures.Future | None = None
    self._unverified: list[tuple[int, tuple[str, ...]]] = []

  def save(self, step: int, state: TrainState, data_iter: Any | None, config: Any, force: bool = False) -> None:
    self.wait()
    data = None if data_iter is None else _FrozenDataState(data_iter.get_state())
    items = ("params", "opt_state", "config") + (("data",) if data is not None else ())
    self._unverified.append((step, items))
    if self.snapshot_on_device:
      state = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), state)
      self._future = self._pool.submit(save, self.mgr, step, state, data, config, force=force)
    else:
      save(self.mgr, step, state, data, config, force=force)

  def poll(self) -> None:
    """Raises now if a background save has already failed (cheap; call once per step)."""
    if self._future is not None and self._future.done():
      self._future.result()

  def wait(self) -> None:
    """Until every started save is complete on disk and verified (raises SaveError otherwise)."""
    if self._future is not None:
      future, self._future = self._future, None
      try:
        future.result()
      except SaveError:
        self._unverified.clear()
        raise
      except Exception as e:  # Orbax / tensorstore / OS errors of the save: the step is not saved
        step = self._unverified[-1][0] if self._unverified else "?"
        self._unverified.clear()
        raise SaveError(f"checkpoint save of step {step} failed: {type(e).__name__}: {e}") from e
    self.mgr.wait_until_finished()
    todo, self._unverified = self._unverified, []
    for step, items in todo:
      verify_saved(self.mgr, step, items)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._pool.shutdown()
      self.mgr.close()


def resolve_path(path: str) -> tuple[str, int | None]:
  """A checkpoint given as a step folder (`.../checkpoints/1200`), a checkpoints folder or a run
  folder -> (checkpoints folder, step or None for the newest)."""
  path = os.path.abspath(path)
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(base)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(path):
    raise CheckpointMissing(path, f"checkpoint path {path} does not exist")
  return path, None


def _handlers() -> dict:
  return {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
          "data": grain.checkpoint.CheckpointHandler(), "config": ocp.JsonCheckpointHandler()}


def _read_only(directory: str, items: tuple[str, ...]) -> ocp.CheckpointManager:
  """A manager that reads `items` of existing checkpoints and writes nothing."""
  if not os.path.isdir(directory):
    raise CheckpointMissing(directory, f"no checkpoints folder {directory}")
  handlers = _handlers()
  with _quiet_absl():  # the options Orbax would otherwise override with a warning each
    return ocp.CheckpointManager(os.path.abspath(directory), item_handlers={i: handlers[i] for i in items},
                                 options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                                                       create=False))


def _pick_step(mgr: ocp.CheckpointManager, step: int | None) -> int:
  steps = mgr.all_steps()
  if not steps:
    raise CheckpointMissing(str(mgr.directory), f"no checkpoint in {mgr.directory}")
  if step is None:
    return max(steps)
  if step not in steps:
    raise CheckpointMissing(str(mgr.directory), f"no checkpoint of step {step} in {mgr.directory} "
                            f"(saved steps: {', '.join(map(str, sorted(steps)))})")
  return step


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """Parameters only (no optimizer state), onto the shardings `abstract_params` carries.

  A missing or unreadable checkpoint raises CheckpointMissing (one line naming it)."""
  mgr = _read_only(directory, ("params",))
  try:
    step = _pick_step(mgr, step)
    try:
      check_readable(directory, step, ("params",))
      out = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    except READ_ERRORS as e:
      raise CheckpointMissing(directory, f"checkpoint {os.path.join(directory, str(step))} is unreadable "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); pass --step= of "
                              "another saved step") from None
  finally:
    mgr.close()
  return out["params"], step


def saved_config(directory: str, step: int | None = None) -> dict:
  """The resolved config JSON stored with a checkpoint."""
  mgr = _read_only(directory, ("config",))
  try:
    step = _pick_step(mgr, step)
    try:
      return mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except READ_ERRORS as e:
      raise CheckpointMissing(directory, f"the config of checkpoint {os.path.join(directory, str(step))} is "
                              f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  finally:
    mgr.close()
