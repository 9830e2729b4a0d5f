"""Grain pipeline: config.data -> per-process batches in the contract of nextlat_jax.data.packing.

Index-addressable sources (`make_source`: task generators, pre-tokenized ArrayRecord shards, held-out
splits): `make_dataset` returns a grain.MapDataset whose element s is this process's local batch of
step s: a dict of int32 arrays (global_batch_size // process_count, row_len). The global batch of step
s is rows s*G .. (s+1)*G - 1 of the seeded source (G = global batch size); process p holds the p-th
contiguous slice of it. Everything is a pure function of (config, seed, s, p, process_count), so
resuming at step s is `ds[s:]` and the iterator needs no state beyond the step, on any process count.

Streaming sources (a module with `make_iter_dataset` that returns a grain.IterDataset for the split:
FineWeb-Edu parquet, TFDS): `make_dataset` returns a grain.IterDataset of this process's local
batches. Its position is grain's own iterator state, which `BatchIterator` checkpoints; it is exact
for the same process layout only (see nextlat_jax.data.sources.stream).
"""

from __future__ import annotations

import importlib
import json
import logging
import weakref

import grain
import ml_collections

from nextlat_jax.data.dataset_info import SPLITS, DatasetInfo, need

__all__ = ['SPLITS', 'DatasetInfo', 'need']  # re-exported: sources may import them from here too
REPOSITION = ('error', 'restart')
log = logging.getLogger(__name__)


# data.name -> module providing `info(data_cfg) -> DatasetInfo` and
# `make_source(data_cfg, *, split, seed)` (a grain RandomAccessDataSource of rows in the batch contract),
# and optionally `make_iter_dataset(data_cfg, *, split, seed, process_index, process_count)` returning
# a grain.IterDataset of this process's rows (streaming) or None (that split uses make_source).
SOURCES = {
    'street_grid': 'nextlat_jax.data.tasks.walks',
    'manhattan': 'nextlat_jax.data.tasks.walks',
    'fineweb_edu': 'nextlat_jax.data.sources.fineweb',
    'pretokenized': 'nextlat_jax.data.sources.pretokenized',
    'tfds': 'nextlat_jax.data.sources.tfds_source',
    'path_star': 'nextlat_jax.data.tasks.path_star',
    'countdown': 'nextlat_jax.data.tasks.countdown',
    'a5': 'nextlat_jax.data.tasks.a5',
    'hmm': 'nextlat_jax.data.tasks.hmm',
}


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
) -> grain.MapDataset | grain.IterDataset:
  """Element s: this process's local batch of step s, dict of int32 (local_batch, row_len).

  A grain.MapDataset (indexed by step) for index-addressable sources; a grain.IterDataset of the
  local batches in step order for a streaming split.
  """
  need(process_count >= 1, 'process_count', process_count, 'must be >= 1')
  need(0 <= process_index < process_count, 'process_index', process_index,
        f'must be in [0, process_count={process_count})')
  need(global_batch_size >= 1 and global_batch_size % process_count == 0, 'global_batch_size',
        global_batch_size, f'must be a positive multiple of process_count={process_count}')
  need(split in SPLITS, 'split', split, f'expected one of {SPLITS}')
  module = _module(data_cfg)
  if hasattr(module, 'make_iter_dataset'):
    rows = module.make_iter_dataset(data_cfg, split=split, seed=seed, process_index=process_index,
                                    process_count=process_count)
    if rows is not None:
      policy = data_cfg.get('reposition', 'error')
      need(policy in REPOSITION, 'data.reposition', policy, f'expected one of {REPOSITION}')
      ds = rows.batch(global_batch_size // process_count, drop_remainder=True)
      ds.reposition = policy  # read by BatchIterator.seek
      return ds
  source = make_source(data_cfg, split=split, seed=seed)
  num_steps = len(source) // global_batch_size
  need(num_steps >= 1, 'data.num_rows' if split == 'train' else 'data.eval_rows', len(source),
        f'fewer rows than one global batch (global_batch_size={global_batch_size})')
  local_batch = global_batch_size // process_count
  if hasattr(source, 'get_batch'):  # a source that reads a whole batch at once (the same rows)
    ds = grain.MapDataset.range(num_steps * process_count).map(
        lambda b: source.get_batch(range(b * local_batch, (b + 1) * local_batch)))
  else:
    ds = grain.MapDataset.source(source)[: num_steps * global_batch_size]
    ds = ds.batch(local_batch, drop_remainder=True)
  return ds[process_index::process_count]  # global step s = local batches s*P .. s*P + P - 1


class DataStateMismatch(ValueError):
  """A saved data-iterator state that does not belong to this run's data layout (not a damaged file)."""


class BatchIterator:
  """Local batches of a step-indexed dataset (or of a stream) from a given step, with prefetch.

  Its checkpointable state is the step it will read next, with the layout that produced it (grain's
  Orbax handler stores it per process); for a stream also grain's iterator state. Because batches
  of an index-addressable dataset are a pure function of the step, a run restored on a different
  number of processes repositions from the train state's step alone. A stream cannot reposition:
  `seek` to another step raises, or restarts the stream if data.reposition == 'restart'.
  """

  def __init__(self, ds: grain.MapDataset | grain.IterDataset, step: int, layout: dict,
               read_options: grain.ReadOptions | None = None):
    self._ds, self._layout = ds, dict(layout)
    self._stream = isinstance(ds, grain.IterDataset)
    # Reading threads overlap ArrayRecord I/O and numpy (both release the GIL); the order is fixed.
    self._read_options = read_options or grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)
    self.step, self._closer = None, None
    self.seek(step)

  def _set_iterator(self, it) -> None:
    """Closes the previous iterator's prefetch threads (also at interpreter exit) and keeps `it`."""
    if self._closer is not None:
      self._closer()
    self._it = it
    close = getattr(it, 'close', None)
    self._closer = weakref.finalize(self, close) if close is not None else None

  def seek(self, step: int) -> None:
    """Continue from the local batch of global step `step`."""
    step = int(step)
    if not self._stream:
      self.step = step
      self._set_iterator(iter(self._ds[self.step:].to_iter_dataset(self._read_options)))
      return
    if step == self.step:
      return
    if step != 0:
      why = (f'a streaming data source cannot jump to step {step} without its iterator state saved '
             f'for this process layout {self._layout}')
      if getattr(self._ds, 'reposition', 'error') != 'restart':
        raise ValueError(f'{why}; use data.name=pretokenized for elastic resume, or set '
                         "data.reposition='restart' to start the stream afresh")
      log.warning('%s: starting the stream afresh (data.reposition=restart); rows will repeat', why)
    self.step = step
    self._set_iterator(iter(grain.experimental.ThreadPrefetchIterDataset(
        self._ds, prefetch_buffer_size=self._read_options.prefetch_buffer_size)))

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    self.step += 1
    return batch

  def get_state(self) -> bytes:
    state = {'step': self.step, **self._layout}
    if self._stream:
      state['stream'] = self._it.get_state()
    return json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state)
    for key, value in self._layout.items():
      if saved.get(key) != value:
        raise DataStateMismatch(f'data iterator state was saved with {key}={saved.get(key)!r}, '
                                f'this run has {key}={value!r}')
    if not self._stream:
      self.seek(saved['step'])
      return
    if 'stream' not in saved:
      raise DataStateMismatch('data iterator state has no stream position (saved by an index-addressable '
                              'source?); this run streams its data')
    self._it.set_state(saved['stream'])
    self.step = int(saved['step'])

  def stats(self) -> dict:
    """A stream's document counts so far (documents, skipped, invalid_utf8_replaced, tokens, rows;
    read-ahead included); {} for index-addressable datasets."""
    todo = [self._ds] if self._stream else []
    while todo:
      ds = todo.pop()
      if hasattr(ds, 'live_stats'):
        return ds.live_stats()
      todo.extend(getattr(ds, 'parents', ()))
    return {}

  def start_prefetch(self) -> None:
    """Part of grain's checkpoint protocol; prefetch starts on the first `next`."""


def process_row_ranges(batch_sharding, global_batch: int, row_len: int, process_of=None) -> dict[int, set]:
  """Process index -> the set of global batch rows its addressable devices hold (any mesh layout).

  `process_of(device)` defaults to `device.process_index` (tests pass another to emulate hosts)."""
  process_of = process_of or (lambda d: d.process_index)
  rows: dict[int, set] = {}
  for device, (row_slice, _) in batch_sharding.devices_indices_map((global_batch, row_len)).items():
    start, stop, _ = row_slice.indices(global_batch)
    rows.setdefault(process_of(device), set()).update(range(start, stop))
  return rows


def check_process_rows(batch_sharding, global_batch: int, row_len: int, process_count: int,
                       process_of=None) -> None:
  """Raises ValueError unless every process's devices hold global_batch / process_count rows of each
  global batch that no other process holds: the local batch `make_dataset` gives a process then fills
  exactly its shards (`jax.make_array_from_process_local_data` maps the local rows onto the process's
  row slices in order, contiguous or not; the loss is a sum over rows, so their global order does not
  matter). Wrong when a batch shard's tensor-parallel replicas span processes."""
  local = global_batch // process_count
  held = process_row_ranges(batch_sharding, global_batch, row_len, process_of)
  for p, rows in sorted(held.items()):
    shared = sorted(rows & set().union(*(r for q, r in held.items() if q != p)))
    if len(rows) != local or shared:
      raise ValueError(f"process {p}'s devices hold {len(rows)} rows of each global batch of {global_batch}"
                       + (f", {len(shared)} of them also held by another process" if shared else "")
                       + f", but the data gives each process its own {local}; every batch (data, fsdp) shard "
                       "and its tensor-parallel replicas must sit on one process (keep mesh.tensor within a host)")
