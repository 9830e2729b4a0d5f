"""Everything checked before a run compiles or writes: the config resolved against its data and
validated for the devices, the workdir, and the datasets (enough rows for the steps, each process's rows
where its shards need them). Each refusal is a one-line ConfigError."""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import ml_collections

from nextlat_jax import config as config_lib
from nextlat_jax.data import pipeline

log = logging.getLogger(__name__)


def resolve(config: ml_collections.ConfigDict, num_devices: int | None = None
            ) -> tuple[ml_collections.ConfigDict, pipeline.DatasetInfo]:
  """Makes a local data.path absolute, fills dataset-derived values (vocab size, EOS id) and validates for `num_devices` (default: all
  devices); returns a locked copy."""
  config = ml_collections.ConfigDict(config.to_dict())
  path = config.data.get("path")
  if isinstance(path, str) and path and "://" not in path:  # saved absolute: a run reads from any directory
    config.data.path = os.path.abspath(path)
  try:
    info = pipeline.dataset_info(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError("data", config.data.get("name"), str(e)) from None
  fill_from_data(config, info)
  config_lib.validate(config, jax.device_count() if num_devices is None else num_devices,
                      data_vocab=info.vocab_size)
  config.lock()
  return config, info


def fill_from_data(config: ml_collections.ConfigDict, info: pipeline.DatasetInfo) -> None:
  """What a config takes from its data: model.vocab_size when 0, and data.eos_id."""
  with config.unlocked():
    if not config.model.vocab_size:
      config.model.vocab_size = info.vocab_size
    config.data.eos_id = info.eos_id


def check_restore_from(config: ml_collections.ConfigDict) -> None:
  """ConfigError unless checkpoint.restore_from (when set) is an existing checkpoint, checkpoints or run
  folder (a gs:// path is left to Orbax)."""
  source = config.checkpoint.get("restore_from")
  if source and "://" not in source and not os.path.isdir(source):
    raise config_lib.ConfigError("checkpoint.restore_from", source, "no such folder (a run, its checkpoints "
                                 "folder or one step's folder)")


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
    raise config_lib.ConfigError("data", config.data.get("name"), f"{e}{_data_keys(config.data, str(e))}") from None
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


def _data_keys(data: ml_collections.ConfigDict, message: str) -> str:
  """' (data.path=..., data.eval_rows=...)': the data keys a refusal of `message` does not name yet."""
  keys = [f"data.{k}={data[k]!r}" for k in ("path", "eval_path", "eval_rows")
          if k in data and data[k] not in ("", None) and f"data.{k}=" not in message]
  return f" ({', '.join(keys)})" if keys else ""
