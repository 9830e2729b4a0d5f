"""Grain pipeline: config.data -> per-process batches in the contract of nextlat_jax.data.packing.

`make_dataset` returns a grain.MapDataset whose element s is this process's local batch of step s:
a dict of int32 arrays (global_batch_size // process_count, row_len). The global batch of step s is
rows s*G .. (s+1)*G - 1 of the seeded source (G = global batch size); process p holds the p-th
contiguous slice of it. Everything is a pure function of (config, seed, s, p, process_count), so
resuming at step s is `ds[s:]` and the iterator needs no state beyond the step.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import grain
import ml_collections

SPLITS = ('train', 'eval')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset that the model and trainer need."""

  vocab_size: int
  eos_id: int
  pad_id: int
  row_len: int


# data.name -> module providing `info(data_cfg) -> DatasetInfo` and
# `make_source(data_cfg, *, split, seed)` (a grain RandomAccessDataSource of rows in the batch contract).
SOURCES = {
    'street_grid': 'nextlat_jax.data.tasks.walks',
    'manhattan': 'nextlat_jax.data.tasks.walks',
}


def need(ok: bool, key: str, value, why: str) -> None:
  """Raises ValueError('key=value: why') unless ok."""
  if not ok:
    raise ValueError(f'{key}={value!r}: {why}')


def _module(data_cfg: ml_collections.ConfigDict):
  need(data_cfg.name in SOURCES, 'data.name', data_cfg.name,
       f'unknown dataset; expected one of {tuple(SOURCES)}')
  return importlib.import_module(SOURCES[data_cfg.name])


def default_data_config() -> ml_collections.ConfigDict:
  """The quickstart's data: random walks on a generated 8x8 one-way street grid."""
  from nextlat_jax.data.tasks import walks
  return walks.default_data_config()


def dataset_info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  """Vocabulary size, EOS/pad ids and row length of the configured dataset."""
  return _module(data_cfg).info(data_cfg)


def make_source(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int):
  """The index-addressable row source of one split."""
  need(split in SPLITS, 'split', split, f'expected one of {SPLITS}')
  return _module(data_cfg).make_source(data_cfg, split=split, seed=seed)


def make_dataset(
    data_cfg: ml_collections.ConfigDict, *, split: str, global_batch_size: int, seed: int,
    process_index: int, process_count: int,
) -> grain.MapDataset:
  """Element s: this process's local batch of step s, dict of int32 (local_batch, row_len)."""
  need(process_count >= 1, 'process_count', process_count, 'must be >= 1')
  need(0 <= process_index < process_count, 'process_index', process_index,
        f'must be in [0, process_count={process_count})')
  need(global_batch_size >= 1 and global_batch_size % process_count == 0, 'global_batch_size',
        global_batch_size, f'must be a positive multiple of process_count={process_count}')
  source = make_source(data_cfg, split=split, seed=seed)
  num_steps = len(source) // global_batch_size
  need(num_steps >= 1, 'data.num_rows' if split == 'train' else 'data.eval_rows', len(source),
        f'fewer rows than one global batch (global_batch_size={global_batch_size})')
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.source(source)[: num_steps * global_batch_size]
  ds = ds.batch(local_batch, drop_remainder=True)  # global step s = batches s*P .. s*P + P - 1
  return ds[process_index::process_count]


class BatchIterator:
  """Local batches of a step-indexed dataset from a given step, with prefetch.

  Its checkpointable state is the step it will read next, with the layout that produced it
  (grain's Orbax handler stores it per process). Because batches are a pure function of the step,
  a run restored on a different number of processes repositions from the train state's step alone.
  """

  def __init__(self, ds: grain.MapDataset, step: int, layout: dict, read_options: grain.ReadOptions | None = None):
    self._ds, self._layout = ds, dict(layout)
    self._read_options = read_options or grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    self.seek(step)

  def seek(self, step: int) -> None:
    """Continue from the local batch of global step `step`."""
    self.step = int(step)
    self._it = iter(self._ds[self.step:].to_iter_dataset(self._read_options))

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    self.step += 1
    return batch

  def get_state(self) -> bytes:
    return json.dumps({'step': self.step, **self._layout}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state)
    for key, value in self._layout.items():
      if saved.get(key) != value:
        raise ValueError(f'data iterator state was saved with {key}={saved.get(key)!r}, '
                         f'this run has {key}={value!r}')
    self.seek(saved['step'])

  def start_prefetch(self) -> None:
    """Part of grain's checkpoint protocol; prefetch starts on the first `next`."""
