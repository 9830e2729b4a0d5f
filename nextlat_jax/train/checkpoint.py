"""Orbax checkpoints: one composite per saved step, visible only once complete.

Items of a checkpoint:
  params     the parameters (restorable alone, onto any mesh, for evaluation)
  opt_state  {"step", "opt_state"}: the rest of the train state
  data       each process's data-iterator state (grain's per-process handler)
  config     the resolved config as JSON
Restoring onto another mesh / device count passes abstract targets that carry the new shardings.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from nextlat_jax.train.step import TrainState

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "data", "config")


def manager(directory: str, ckpt_cfg: Any, *, read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints plus every `keep_period`-th step for good; saves asynchronously."""
  keep_period = int(ckpt_cfg.get("keep_period", 0)) or None
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(ckpt_cfg.get("keep", 3)), keep_period=keep_period, create=not read_only,
      enable_async_checkpointing=bool(ckpt_cfg.get("async_save", True)), read_only=read_only)
  handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
              "data": grain.checkpoint.CheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def _rest(state: TrainState) -> dict:
  """The train state without its parameters."""
  return {"step": state.step, "opt_state": state.opt_state, "nonfinite": state.nonfinite}


def save(mgr: ocp.CheckpointManager, step: int, state: TrainState, data_iter: Any, config: Any, *,
         force: bool = False) -> bool:
  """Starts an (asynchronous) save of `state`, which is at `step` (passed in: no device sync here).

  `config` is the resolved ConfigDict or its JSON-ready dict.
  """
  config_dict = config if isinstance(config, dict) else json.loads(config.to_json())
  args = ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(_rest(state)),
      data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config_dict))
  return mgr.save(step, args=args, force=force)


def restore_step(mgr: ocp.CheckpointManager, step: int | None, abstract_state: TrainState,
                 data_iter: Any | None = None) -> TrainState:
  """The full train state of `step` (None: the newest) onto the shardings of `abstract_state`."""
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
  items = {"params": ocp.args.StandardRestore(abstract_state.params),
           "opt_state": ocp.args.StandardRestore(_rest(abstract_state))}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  out = mgr.restore(step, args=ocp.args.Composite(**items))
  rest = out["opt_state"]
  return TrainState(step=rest["step"], params=out["params"], opt_state=rest["opt_state"],
                    nonfinite=rest["nonfinite"])


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
  At most one save is in flight; a new save first waits for the previous one.
  """

  def __init__(self, mgr: ocp.CheckpointManager, snapshot_on_device: bool = True):
    self.mgr, self.snapshot_on_device = mgr, snapshot_on_device
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
    self._future: concurrent.futures.Future | None = None

  def save(self, step: int, state: TrainState, data_iter: Any, config: Any, force: bool = False) -> None:
    self.wait()
    data = _FrozenDataState(data_iter.get_state())
    if self.snapshot_on_device:
      state = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), state)
      self._future = self._pool.submit(save, self.mgr, step, state, data, config, force=force)
    else:
      save(self.mgr, step, state, data, config, force=force)

  def wait(self) -> None:
    """Until every started save is complete on disk (raises the save's error, if any)."""
    if self._future is not None:
      future, self._future = self._future, None
      future.result()
    self.mgr.wait_until_finished()

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
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  return path, None


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: TrainState, data_iter: Any | None = None
                   ) -> TrainState | None:
  """Restores the newest checkpoint that reads back whole; warns about and skips broken ones.

  `data_iter` (if given) is restored too when the checkpoint holds a state for this process layout.
  """
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      state = restore_step(mgr, step, abstract_state, _if_layout_matches(mgr, step, data_iter))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
      log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                      os.path.join(str(mgr.directory), str(step)), type(e).__name__, str(e)[:300])
      continue
    log.info("restored step %d from %s", step, mgr.directory)
    return state
  return None


def _if_layout_matches(mgr: ocp.CheckpointManager, step: int, data_iter: Any | None) -> Any | None:
  """The data iterator, if this checkpoint saved one for the current (process index, count)."""
  if data_iter is None:
    return None
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  path = os.path.join(str(mgr.directory), str(step), "data", name)
  if os.path.exists(path):
    return data_iter
  log.info("checkpoint %d has no data state for %s; repositioning the data from the step", step, name)
  return None


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """Parameters only (no optimizer state), onto the shardings `abstract_params` carries."""
  mgr = ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True),
                              item_handlers={"params": ocp.StandardCheckpointHandler()})
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  out = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
  return out["params"], step


def saved_config(directory: str, step: int | None = None) -> dict:
  """The resolved config JSON stored with a checkpoint."""
  mgr = ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True),
                              item_handlers={"config": ocp.JsonCheckpointHandler()})
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  return mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
