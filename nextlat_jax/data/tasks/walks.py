"""Street-graph random-walk rows (the Manhattan world-model task, or a generated street grid) as a
data source for `nextlat_jax.data.pipeline`."""

from __future__ import annotations

import functools
import os

import ml_collections

from nextlat_jax.data.dataset_info import SPLITS, DatasetInfo
from nextlat_jax.data.dataset_info import need as _need
from nextlat_jax.data.tasks.manhattan import StreetGraph, WalkRowSource, WordTokenizer

_WALK_TASKS = ('street_grid', 'manhattan')


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


@functools.lru_cache(maxsize=8)
def _load_graph(name: str, graph_path: str, rows: int, cols: int, grid_seed: int
                ) -> StreetGraph:
  if name == 'manhattan':
    if not os.path.isfile(graph_path):
      raise ValueError(f'data.graph_path={graph_path!r}: street graph file not found '
                       f'(absolute: {os.path.abspath(graph_path)})')
    return StreetGraph.from_tsv(graph_path)
  return StreetGraph.grid(rows, cols, seed=grid_seed)


def _graph(data_cfg: ml_collections.ConfigDict) -> StreetGraph:
  _need(data_cfg.name in _WALK_TASKS, 'data.name', data_cfg.name,
        f'unknown dataset; expected one of {_WALK_TASKS}')
  if data_cfg.name == 'manhattan':
    return _load_graph('manhattan', str(data_cfg.graph_path), 0, 0, 0)
  for key in ('grid_rows', 'grid_cols'):
    _need(data_cfg[key] >= 2, f'data.{key}', data_cfg[key], 'must be >= 2')
  return _load_graph('street_grid', '', data_cfg.grid_rows, data_cfg.grid_cols, data_cfg.grid_seed)


def info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  """Vocabulary size, EOS/pad ids and row length of the configured dataset."""
  _need(data_cfg.seq_len >= 1, 'data.seq_len', data_cfg.seq_len, 'must be >= 1')
  tokenizer = WordTokenizer(_graph(data_cfg).node_ids)
  return DatasetInfo(vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                     pad_id=tokenizer.pad_id, row_len=data_cfg.seq_len + 1)


def make_source(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int
                ) -> WalkRowSource:
  """The index-addressable row source (grain RandomAccessDataSource) of one split."""
  _need(split in SPLITS, 'split', split, f'expected one of {SPLITS}')
  row_len = info(data_cfg).row_len
  rows_key = 'num_rows' if split == 'train' else 'eval_rows'
  _need(data_cfg[rows_key] >= 0, f'data.{rows_key}', data_cfg[rows_key], 'must be >= 0')
  _need(1 <= data_cfg.min_moves <= data_cfg.max_moves, 'data.min_moves', data_cfg.min_moves,
        f'need 1 <= min_moves <= max_moves (max_moves={data_cfg.max_moves})')
  fraction = data_cfg.heldout_fraction
  _need(0.0 <= fraction < 1.0 and (split == 'train' or fraction > 0.0), 'data.heldout_fraction',
        fraction, 'need 0 <= f < 1, and f > 0 for the eval split')
  _need(seed >= 0, 'seed', seed, 'must be >= 0')
  return WalkRowSource(
      _graph(data_cfg), row_len=row_len, num_rows=data_cfg[rows_key], seed=seed, split=split,
      context_length=data_cfg.context_length, min_moves=data_cfg.min_moves,
      max_moves=data_cfg.max_moves, resample_short=data_cfg.get('resample_short', True),
      heldout_fraction=fraction, split_seed=data_cfg.get('split_seed', 0))
