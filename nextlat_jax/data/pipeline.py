"""Grain pipeline: config.data -> per-process batches in the contract of nextlat_jax.data.packing.

`make_dataset` returns a grain.MapDataset whose element s is this process's local batch of step s:
a dict of int32 arrays (global_batch_size // process_count, row_len). The global batch of step s is
rows s*G .. (s+1)*G - 1 of the seeded source (G = global batch size); process p holds the p-th
contiguous slice of it. Everything is a pure function of (config, seed, s, p, process_count), so
resuming at step s is `ds[s:]` and the iterator needs no state beyond the step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import grain
import ml_collections

from nextlat_jax.data.tasks import manhattan

SPLITS = ('train', 'eval')
_WALK_TASKS = ('street_grid', 'manhattan')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset that the model and trainer need."""

  vocab_size: int
  eos_id: int
  pad_id: int
  row_len: int


def default_data_config() -> ml_collections.ConfigDict:
  """CPU-quickstart data config: random walks on a generated 8x8 one-way street grid."""
  return ml_collections.ConfigDict(dict(
      name='street_grid',  # 'street_grid' (generated) or 'manhattan' (edge file at graph_path)
      graph_path='../shared/data/manhattan/edges.tsv',  # used when name == 'manhattan'
      seq_len=128,  # row length is seq_len + 1; Manhattan block 256 is [derived], not specified
      context_length=1,  # origin and destination are never targets (TASKS.md §1.5)
      grid_rows=8,
      grid_cols=8,
      grid_seed=0,
      min_moves=3,  # not specified: walk length counts moves, U{min_moves..max_moves}
      max_moves=30,  # quickstart; 97 keeps Manhattan documents <= 100 tokens (TASKS.md §1.3)
      resample_short=True,  # not specified: resample walks cut short by a sink below min_moves
      heldout_fraction=0.1,  # not specified: share of (origin, destination) pairs held out
      split_seed=0,  # not specified: seeds the held-out pair hash
      num_rows=1 << 24,  # train rows (generated on the fly; nominal length)
      eval_rows=1024,
  ))


def _need(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise ValueError(f'{key}={value!r}: {why}')


@functools.lru_cache(maxsize=8)
def _load_graph(name: str, graph_path: str, rows: int, cols: int, grid_seed: int
                ) -> manhattan.StreetGraph:
  if name == 'manhattan':
    if not os.path.isfile(graph_path):
      raise ValueError(f'data.graph_path={graph_path!r}: street graph file not found '
                       f'(absolute: {os.path.abspath(graph_path)})')
    return manhattan.StreetGraph.from_tsv(graph_path)
  return manhattan.StreetGraph.grid(rows, cols, seed=grid_seed)


def _graph(data_cfg: ml_collections.ConfigDict) -> manhattan.StreetGraph:
  _need(data_cfg.name in _WALK_TASKS, 'data.name', data_cfg.name,
        f'unknown dataset; expected one of {_WALK_TASKS}')
  if data_cfg.name == 'manhattan':
    return _load_graph('manhattan', str(data_cfg.graph_path), 0, 0, 0)
  for key in ('grid_rows', 'grid_cols'):
    _need(data_cfg[key] >= 2, f'data.{key}', data_cfg[key], 'must be >= 2')
  return _load_graph('street_grid', '', data_cfg.grid_rows, data_cfg.grid_cols, data_cfg.grid_seed)


def dataset_info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  """Vocabulary size, EOS/pad ids and row length of the configured dataset."""
  _need(data_cfg.seq_len >= 1, 'data.seq_len', data_cfg.seq_len, 'must be >= 1')
  tokenizer = manhattan.WordTokenizer(_graph(data_cfg).node_ids)
  return DatasetInfo(vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                     pad_id=tokenizer.pad_id, row_len=data_cfg.seq_len + 1)


def make_source(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int
                ) -> manhattan.WalkRowSource:
  """The index-addressable row source (grain RandomAccessDataSource) of one split."""
  _need(split in SPLITS, 'split', split, f'expected one of {SPLITS}')
  info = dataset_info(data_cfg)
  rows_key = 'num_rows' if split == 'train' else 'eval_rows'
  _need(data_cfg[rows_key] >= 0, f'data.{rows_key}', data_cfg[rows_key], 'must be >= 0')
  _need(1 <= data_cfg.min_moves <= data_cfg.max_moves, 'data.min_moves', data_cfg.min_moves,
        f'need 1 <= min_moves <= max_moves (max_moves={data_cfg.max_moves})')
  fraction = data_cfg.heldout_fraction
  _need(0.0 <= fraction < 1.0 and (split == 'train' or fraction > 0.0), 'data.heldout_fraction',
        fraction, 'need 0 <= f < 1, and f > 0 for the eval split')
  _need(seed >= 0, 'seed', seed, 'must be >= 0')
  return manhattan.WalkRowSource(
      _graph(data_cfg), row_len=info.row_len, num_rows=data_cfg[rows_key], seed=seed, split=split,
      context_length=data_cfg.context_length, min_moves=data_cfg.min_moves,
      max_moves=data_cfg.max_moves, resample_short=data_cfg.get('resample_short', True),
      heldout_fraction=fraction, split_seed=data_cfg.get('split_seed', 0))


def make_dataset(
    data_cfg: ml_collections.ConfigDict, *, split: str, global_batch_size: int, seed: int,
    process_index: int, process_count: int,
) -> grain.MapDataset:
  """Element s: this process's local batch of step s, dict of int32 (local_batch, row_len)."""
  _need(process_count >= 1, 'process_count', process_count, 'must be >= 1')
  _need(0 <= process_index < process_count, 'process_index', process_index,
        f'must be in [0, process_count={process_count})')
  _need(global_batch_size >= 1 and global_batch_size % process_count == 0, 'global_batch_size',
        global_batch_size, f'must be a positive multiple of process_count={process_count}')
  source = make_source(data_cfg, split=split, seed=seed)
  num_steps = len(source) // global_batch_size
  _need(num_steps >= 1, 'data.num_rows' if split == 'train' else 'data.eval_rows', len(source),
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
