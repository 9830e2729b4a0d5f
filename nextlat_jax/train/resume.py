"""Where a run starts, and what it does with the checkpoints in its workdir: resume, refuse, or move a
broken one aside (else checkpoint.restore_from, else a fresh init).

A workdir with checkpoints is resumed or refused, never trained over:
  - incompatible with the run's config (another objective or dynamics kind; a parameter or optimizer
    leaf whose path, shape or dtype differs): ResumeRefused, before anything is written;
  - unreadable (missing item, truncated or garbled file, I/O error): a warning naming it; the newest
    readable one is restored and every newer unreadable one is renamed `<step>.corrupt`, so the run saves
    that step again when it gets there; if none is readable the run stops (unless
    checkpoint.allow_fresh_start, which moves them all aside and starts fresh).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from nextlat_jax.config import ConfigError
from nextlat_jax.data.pipeline import DataStateMismatch
from nextlat_jax.train import checkpoint
from nextlat_jax.train.step import TrainState

log = logging.getLogger(__name__)

# Config keys that change what the state means although every leaf may keep its shape.
IDENTITY_KEYS = (("objective", "name"), ("dynamics", "kind"))


class ResumeRefused(ConfigError):
  """The workdir's checkpoints cannot be resumed by this config; one line saying why and what to do."""

  def __init__(self, workdir: str, why: str):
    super().__init__("workdir", workdir, why)


def _key(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _flat(tree: Any) -> dict[str, Any]:
  """path string -> leaf, with dict keys, attribute names and sequence indices written alike (Orbax
  stores optax's named tuples as dicts / lists)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  return {"/".join(_key(k) for k in path): leaf for path, leaf in leaves}


def first_mismatch(saved: Any, expected: Any, what: str) -> str | None:
  """The first leaf (in path order) whose presence, shape or dtype differs, as one phrase; else None."""
  s, e = _flat(saved), _flat(expected)
  for path in sorted(set(s) | set(e)):
    if path not in e:
      return f"{what} leaf {path} {tuple(s[path].shape)} is in the checkpoint but not in this config"
    if path not in s:
      return f"{what} leaf {path} {tuple(e[path].shape)} of this config is not in the checkpoint"
    a, b = s[path], e[path]
    if tuple(a.shape) != tuple(b.shape) or jax.numpy.dtype(a.dtype) != jax.numpy.dtype(b.dtype):
      return (f"{what} leaf {path} is {tuple(a.shape)} {jax.numpy.dtype(a.dtype)} in the checkpoint, "
              f"{tuple(b.shape)} {jax.numpy.dtype(b.dtype)} in this config")
  return None


def _metadata(mgr: ocp.CheckpointManager, step: int) -> tuple[Any, Any, dict]:
  """(params, rest-of-state, config) metadata of `step`; raises one of checkpoint.READ_ERRORS if damaged."""
  checkpoint.check_readable(mgr.directory, step)  # first: Orbax reads every array's metadata at once
  md = mgr.item_metadata(step)
  params, rest = md["params"], md["opt_state"]
  if params is None or rest is None:  # Orbax found no _METADATA file: a damaged checkpoint
    raise FileNotFoundError(f"{mgr.directory}/{step}: no tree metadata for params / opt_state")
  config = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  return getattr(params, "tree", params), getattr(rest, "tree", rest), config


def check_compatible(mgr: ocp.CheckpointManager, step: int, abstract_state: TrainState, config: dict,
                     workdir: str, *, warm_start: bool = False) -> bool:
  """Raises ResumeRefused naming the first difference between checkpoint `step` and this run.

  With `warm_start` (checkpoint.restore_from) only the parameters must fit; returns whether the
  optimizer state fits too. Raises one of checkpoint.READ_ERRORS when the metadata cannot be read."""
  params_md, rest_md, saved = _metadata(mgr, step)
  where = os.path.join(str(mgr.directory), str(step))
  for section, key in () if warm_start else IDENTITY_KEYS:
    old, new = saved.get(section, {}).get(key), config[section][key]
    if old is not None and old != new:
      raise ResumeRefused(workdir, f"checkpoint {where} was trained with {section}.{key}={old!r}, this "
                          f"config has {new!r}; train in a new --workdir")
  why = first_mismatch(params_md, abstract_state.params, "parameter")
  if why:
    raise ResumeRefused(workdir, f"checkpoint {where} does not fit this config: {why}"
                        + ("" if warm_start else "; train in a new --workdir"))
  why = first_mismatch(rest_md, checkpoint.rest_of_state(abstract_state), "optimizer-state")
  if why and not warm_start:
    raise ResumeRefused(workdir, f"checkpoint {where} does not fit this config: {why}; train in a new "
                        f"--workdir, or warm-start a new workdir from these weights with "
                        f"--config.checkpoint.restore_from={where}")
  changed = sorted(_diff(saved, config))
  if changed and not warm_start:
    log.warning("resuming %s with a changed config: %s", where, "; ".join(changed[:8]))
  return why is None


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{k}.")
    elif a != b and not (isinstance(a, list) and isinstance(b, (list, tuple)) and list(a) == list(b)):
      out.append(f"{prefix}{k} {a!r} -> {b!r}")
  return out


def _aside(directory: str, step: int) -> str:
  """Renames checkpoint `step` to `<step>.corrupt` (`.corrupt.N` if taken); returns the new path."""
  src = os.path.join(directory, str(step))
  dst, n = f"{src}.corrupt", 1
  while os.path.exists(dst):
    dst, n = f"{src}.corrupt.{n}", n + 1
  os.rename(src, dst)
  return dst


def _move_aside(directory: str, steps: list[int]) -> None:
  if jax.process_index() == 0:
    for step in steps:
      log.warning("moved unreadable checkpoint %s aside to %s; the run saves step %d again when it gets there",
                  os.path.join(directory, str(step)), _aside(directory, step), step)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("nextlat_checkpoint_move_aside")


def resume(workdir: str, abstract_state: TrainState, data_iter: Any | None, config: dict, *,
           allow_fresh: bool = False) -> TrainState | None:
  """The newest readable checkpoint of `workdir` restored (with the data position if it holds one for
  this process layout), None if there is none (or only unreadable ones and `allow_fresh`).

  Raises ResumeRefused (nothing written) for an incompatible config or when no checkpoint is readable.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  mgr = checkpoint.manager(directory, None, read_only=True)
  steps = sorted(mgr.all_steps(), reverse=True)
  unreadable: list[int] = []
  try:
    for step in steps:
      try:
        check_compatible(mgr, step, abstract_state, config, workdir)
        with_data = data_iter is not None and checkpoint.has_data_state(mgr, step)
        state = checkpoint.restore_step(mgr, step, abstract_state, data_iter if with_data else None)
      except ResumeRefused:
        raise  # a ConfigError, hence a ValueError: not a damaged checkpoint
      except DataStateMismatch as e:
        raise ResumeRefused(workdir, f"checkpoint {directory}/{step}: {e}") from None
      except checkpoint.READ_ERRORS as e:
        log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", os.path.join(directory, str(step)),
                    type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        unreadable.append(step)
        continue
      if not with_data:
        log.info("checkpoint %d has no data state for this process layout; repositioning the data from the step", step)
      _move_aside(directory, unreadable)
      log.info("restored step %d from %s", step, directory)
      return state
  finally:
    mgr.close()
  if not steps:
    return None
  if not allow_fresh:
    raise ResumeRefused(workdir, f"no readable checkpoint among steps {sorted(steps)} in {directory}; "
                        "nothing was changed. Move them away, or set --config.checkpoint.allow_fresh_start=True "
                        "to move them aside and start fresh")
  _move_aside(directory, unreadable)
  log.warning("no readable checkpoint in %s (checkpoint.allow_fresh_start): starting fresh", directory)
  return None


def initial_state(setup: Any, config: Any, workdir: str, data_iter: Any, rng: jax.Array) -> TrainState:
  """Where a run starts: its workdir's newest readable checkpoint (or a refusal), else
  checkpoint.restore_from (the whole state, or the parameters alone if the optimizer state does not fit),
  else `setup.init(rng)`. `setup` is a train.step.Setup."""
  config_dict = json.loads(config.to_json())
  state = resume(workdir, setup.abstract_state, data_iter, config_dict,
                 allow_fresh=bool(config.checkpoint.allow_fresh_start))
  if state is not None:
    return state
  source = config.checkpoint.restore_from
  if source:
    src_dir, step = checkpoint.resolve_path(source)
    src = checkpoint.manager(src_dir, config.checkpoint, read_only=True)
    try:
      step = src.latest_step() if step is None else step
      if step is None:
        raise checkpoint.CheckpointMissing(src_dir, f"checkpoint.restore_from={source}: no checkpoint in {src_dir}")
      if check_compatible(src, step, setup.abstract_state, config_dict, workdir, warm_start=True):
        state = checkpoint.restore_step(src, step, setup.abstract_state)
        log.info("started from %s step %s (parameters and optimizer state)", src_dir, step)
        return state
    finally:
      src.close()
    params, _ = checkpoint.restore_params(src_dir, setup.abstract_state.params, step)
    log.warning("started from the parameters of %s step %s; the optimizer state there does not fit this "
                "config, so it starts fresh at step 0", src_dir, step)
    return setup.init(rng).replace(params=params)
  return setup.init(rng)
