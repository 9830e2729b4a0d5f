"""Grain pipeline: batch contract, global row order, process sharding, resume, errors."""

import pathlib

import grain
import numpy as np
import pytest

from nextlat_jax.data import packing, pipeline

REAL_GRAPH = pathlib.Path(__file__).resolve().parents[1].parent / 'shared/data/manhattan/edges.tsv'


def small_cfg(**overrides):
  cfg = pipeline.default_data_config()
  cfg.seq_len = 32
  cfg.max_moves = 10
  cfg.num_rows = 64
  cfg.eval_rows = 16
  cfg.update(overrides)
  return cfg


def make(cfg, *, split='train', batch=8, seed=0, p=0, count=1):
  return pipeline.make_dataset(cfg, split=split, global_batch_size=batch, seed=seed,
                               process_index=p, process_count=count)


def assert_batches_equal(a, b):
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_default_config_keys():
  cfg = pipeline.default_data_config()
  for key in ('name', 'graph_path', 'seq_len', 'context_length', 'grid_rows', 'grid_cols',
              'grid_seed', 'min_moves', 'max_moves', 'heldout_fraction', 'num_rows', 'eval_rows',
              'resample_short', 'split_seed'):
    assert key in cfg, key
  assert cfg.name == 'street_grid' and cfg.context_length == 1


def test_dataset_info_grid():
  info = pipeline.dataset_info(small_cfg(grid_rows=4, grid_cols=5))
  assert info == pipeline.DatasetInfo(vocab_size=1 + 9 + 20, eos_id=1, pad_id=0, row_len=33)


@pytest.mark.skipif(not REAL_GRAPH.is_file(), reason=f'{REAL_GRAPH} absent')
def test_dataset_info_manhattan():
  info = pipeline.dataset_info(small_cfg(name='manhattan', graph_path=str(REAL_GRAPH)))
  assert info == pipeline.DatasetInfo(vocab_size=4589, eos_id=1, pad_id=0, row_len=33)


def test_batch_contract_and_global_row_order():
  cfg = small_cfg()
  ds = make(cfg, batch=8)
  assert len(ds) == 64 // 8
  source = pipeline.make_source(cfg, split='train', seed=0)
  for step in (0, 5):
    batch = ds[step]
    assert set(batch) == set(packing.FIELDS)
    for key, value in batch.items():
      assert value.shape == (8, 33) and value.dtype == np.int32, key
    for j in range(8):
      np.testing.assert_array_equal(batch['tokens'][j], source[step * 8 + j]['tokens'])
    refields = packing.pack_row_fields(batch['tokens'], 1, context_length=1)
    assert_batches_equal(batch, refields)


def test_process_sharding_union_is_global_batch():
  cfg = small_cfg()
  whole = make(cfg, batch=8)
  parts = [make(cfg, batch=8, p=p, count=2) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for step in range(len(whole)):
    local = [part[step] for part in parts]
    assert local[0]['tokens'].shape == (4, 33)
    joined = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
    assert_batches_equal(joined, whole[step])


def test_uneven_rows_give_equal_step_counts():
  cfg = small_cfg(num_rows=70)
  parts = [make(cfg, batch=8, p=p, count=4) for p in range(4)]
  assert [len(part) for part in parts] == [8] * 4


def test_resume_and_prefetch_are_deterministic():
  cfg = small_cfg()
  ds = make(cfg, batch=4)
  from_zero = list(ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)))
  assert len(from_zero) == len(ds) == 16
  for step in (0, 3, 15):
    assert_batches_equal(ds[step], from_zero[step])
  resumed = iter(ds[9:].to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
  for step in range(9, 12):
    assert_batches_equal(next(resumed), from_zero[step])
  rebuilt = make(cfg, batch=4)
  assert_batches_equal(rebuilt[7], ds[7])
  assert not np.array_equal(make(cfg, batch=4, seed=1)[7]['tokens'], ds[7]['tokens'])


def test_eval_split():
  cfg = small_cfg()
  ev = make(cfg, split='eval', batch=8)
  assert len(ev) == 16 // 8
  assert not np.array_equal(ev[0]['tokens'], make(cfg, batch=8)[0]['tokens'])


@pytest.mark.parametrize('overrides, kwargs, match', [
    (dict(name='wikitext'), {}, r"data\.name='wikitext'"),
    (dict(name='manhattan', graph_path='/no/such/edges.tsv'), {},
     r"data\.graph_path='/no/such/edges\.tsv'.*not found"),
    ({}, dict(batch=6, count=4), r'global_batch_size=6'),
    ({}, dict(p=2, count=2), r'process_index=2'),
    (dict(eval_rows=4), dict(split='eval', batch=8), r'data\.eval_rows=4'),
    ({}, dict(split='test'), r"split='test'"),
    (dict(min_moves=0), {}, r'data\.min_moves=0'),
    (dict(heldout_fraction=0.0), dict(split='eval'), r'data\.heldout_fraction=0\.0'),
])
def test_bad_config_raises(overrides, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make(small_cfg(**overrides), **kwargs)
