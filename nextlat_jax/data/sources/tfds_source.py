"""Any TFDS dataset with an ArrayRecord data source as the text source, without TensorFlow.

`data.name = 'tfds'`: `tfds.data_source(data.tfds_name, split=data.split, data_dir=data.data_dir,
download=False)` (the dataset must have been prepared with file_format='array_record'). Its records
are documents (feature `data.column`, default 'text'); the train split streams through the same
tokenize / pack / shard / shuffle path as FineWeb-Edu (nextlat_jax.data.sources.stream) with work
units of `data.docs_per_unit` consecutive records; the eval split (`data.eval_split`) is the first
data.eval_rows packed rows, in memory. `nextlat prepare --input=tfds:NAME` pre-tokenizes one instead.
"""
from __future__ import annotations

import functools
from typing import Iterator

import grain
import ml_collections

from nextlat_jax.data import tokenizers
from nextlat_jax.data.pipeline import SPLITS, DatasetInfo, need
from nextlat_jax.data.sources import documents, stream


def default_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="tfds",
      tfds_name="",  # e.g. "wikipedia/20230601.en" or "my_dataset:1.0.0"
      split="train",
      eval_split="",  # "" = no eval split
      data_dir="",  # TFDS data_dir ("" = TFDS's default, ~/tensorflow_datasets)
      column="text",  # the record feature that holds the document
      tokenizer="gpt2",
      tokenizer_path="",
      seq_len=1024,
      context_length=-1,
      docs_per_unit=10_000,  # records per work unit (sharding and shuffling granularity)
      shuffle_window=1024,
      shuffle_files=True,
      num_epochs=0,
      chunk_docs=256,
      eval_rows=256,
      reposition="error",
  ))


def data_source(name: str, split: str, data_dir: str = ""):
  """TFDS's ArrayRecord data source of one split (never downloads)."""
  import tensorflow_datasets as tfds
  need(bool(name), "data.tfds_name", name, "give a TFDS dataset name")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # noqa: BLE001 - TFDS raises many types; one clear line instead
    raise ValueError(f"tfds:{name} split={split!r} data_dir={data_dir!r}: no ArrayRecord data source "
                     f"({type(e).__name__}: {str(e).splitlines()[0]})") from None


@functools.lru_cache(maxsize=8)
def _cached_source(name: str, split: str, data_dir: str):
  return data_source(name, split, data_dir)


def check_column(source, name: str, column: str) -> None:
  keys = list(source.dataset_info.features.keys())
  need(column in keys, "data.column", column, f"tfds:{name} records have features {keys}")


def read_records(name: str, split: str, data_dir: str, column: str, start: int, stop: int
                 ) -> Iterator[bytes | str]:
  """The `column` of records [start, stop) of a TFDS split, 256 at a time."""
  source = _cached_source(name, split, data_dir)
  for lo in range(start, stop, 256):
    for record in source.__getitems__(list(range(lo, min(lo + 256, stop)))):
      yield record[column]


def _read_unit(name: str, split: str, data_dir: str, column: str, unit, start: int):
  return read_records(name, split, data_dir, column, unit[0] + start, unit[1])


def info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  need(int(data_cfg.seq_len) >= 1, "data.seq_len", data_cfg.seq_len, "must be >= 1")
  source = data_source(data_cfg.tfds_name, data_cfg.split, data_cfg.data_dir)
  check_column(source, data_cfg.tfds_name, data_cfg.column)
  vocab, eos = tokenizers.vocab_and_eos(data_cfg.tokenizer, data_cfg.get("tokenizer_path", ""))
  return DatasetInfo(vocab_size=vocab, eos_id=eos, pad_id=eos, row_len=int(data_cfg.seq_len) + 1)


def make_iter_dataset(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int,
                      process_index: int, process_count: int) -> grain.IterDataset | None:
  """The train split's packed rows of this process (None for the eval split)."""
  need(split in SPLITS, "split", split, f"expected one of {SPLITS}")
  if split != "train":
    return None
  info(data_cfg)
  n = len(_cached_source(data_cfg.tfds_name, data_cfg.split, data_cfg.data_dir))
  per = int(data_cfg.docs_per_unit)
  need(per >= 1, "data.docs_per_unit", per, "must be >= 1")
  units = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
  ds = stream.PackedRowsIterDataset(
      units, functools.partial(_read_unit, data_cfg.tfds_name, data_cfg.split, data_cfg.data_dir,
                               data_cfg.column),
      tokenizer=data_cfg.tokenizer, tokenizer_path=data_cfg.get("tokenizer_path", ""),
      row_len=int(data_cfg.seq_len) + 1, context_length=data_cfg.get("context_length", -1),
      seed=seed, process_index=process_index, process_count=process_count,
      num_epochs=int(data_cfg.get("num_epochs", 0)), shuffle_units=bool(data_cfg.get("shuffle_files", True)),
      chunk_docs=int(data_cfg.get("chunk_docs", 256)), name=f"tfds:{data_cfg.tfds_name}")
  window = int(data_cfg.get("shuffle_window", 0))
  if window > 1:
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=window, seed=(seed * 7919 + process_index) % (2**31 - 1))
  return ds


def make_source(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int) -> list[dict]:
  """The eval split: the first data.eval_rows packed rows of data.eval_split, in memory."""
  del seed
  need(split == "eval", "split", split, "data.name='tfds' streams its train split: use pipeline.make_dataset")
  need(bool(data_cfg.eval_split), "data.eval_split", data_cfg.eval_split,
       "the eval split needs a held-out TFDS split (or set eval_every=0)")
  source = data_source(data_cfg.tfds_name, data_cfg.eval_split, data_cfg.data_dir)
  check_column(source, data_cfg.tfds_name, data_cfg.column)
  stats = documents.Stats()
  raw = read_records(data_cfg.tfds_name, data_cfg.eval_split, data_cfg.data_dir, data_cfg.column, 0, len(source))
  texts = (t for t in (documents.decode(r, stats) for r in raw) if t is not None)
  tok = tokenizers.load(data_cfg.tokenizer, data_cfg.get("tokenizer_path", ""))
  return stream.rows_in_memory(texts, tok, int(data_cfg.seq_len) + 1, int(data_cfg.eval_rows),
                               data_cfg.get("context_length", -1))
