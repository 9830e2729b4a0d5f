"""FineWeb-Edu (or any parquet / jsonl / text corpus) streamed: tokenize, pack, shard, shuffle.

`data.name = 'fineweb_edu'`. The train split is a grain IterDataset (`make_iter_dataset`): parquet
shards with a `text` column (the public layout `sample/100BT/*.parquet`) from a local folder or any
fsspec URL, split into work units of one row group each; see nextlat_jax.data.sources.stream for the
packing, the per-process sharding and the exact (same process layout) iterator state.

What it cannot do: resume on a different number of processes (each process packs its own token
stream, so rows depend on the process count) or jump to a step without its saved iterator state. Use
`nextlat prepare` + data.name='pretokenized' for long or elastic runs.

The eval split is the first `eval_rows` packed rows of the held-out files `data.eval_path`, held in
memory (index-addressable, the same every evaluation).
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import grain
import ml_collections

from nextlat_jax.data import tokenizers
from nextlat_jax.data.pipeline import SPLITS, DatasetInfo, need
from nextlat_jax.data.sources import documents, stream


def default_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="fineweb_edu",
      path="",  # files / folder / glob / fsspec URL(s), comma-separated (e.g. .../sample/100BT)
      eval_path="",  # held-out files for the eval split ("" = no eval split); must not overlap path
      column="text",  # parquet column / jsonl key of the document text
      text_split="line",  # .txt files: one document per line | paragraph | file (not specified)
      tokenizer="gpt2",  # gpt2 | bpe
      tokenizer_path="",  # gpt2: folder with encoder.json + vocab.bpe ("" = tiktoken's cache/download)
      seq_len=1024,  # rows hold seq_len + 1 tokens (TASKS.md §6: 1024 or 1025 not specified)
      context_length=-1,  # no prompt masking in pretraining
      shuffle_window=1024,  # rows shuffled within windows of this many (0: off; not specified)
      shuffle_files=True,  # permute the row groups by (seed, epoch) before sharding them
      num_epochs=0,  # 0: repeat forever (every process keeps producing batches)
      chunk_docs=256,  # documents tokenized together (also the restore granularity)
      eval_rows=256,  # rows of the held-out split kept in memory
      reposition="error",  # a restore without saved stream state: 'error' | 'restart' the stream
  ))


def info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  """Vocabulary size, EOS id and row length; checks that data.path names files."""
  need(int(data_cfg.seq_len) >= 1, "data.seq_len", data_cfg.seq_len, "must be >= 1")
  need(bool(data_cfg.path), "data.path", data_cfg.path, "give the corpus files (folder, glob or URL)")
  documents.expand(data_cfg.path)
  vocab, eos = tokenizers.vocab_and_eos(data_cfg.tokenizer, data_cfg.get("tokenizer_path", ""))
  return DatasetInfo(vocab_size=vocab, eos_id=eos, pad_id=eos, row_len=int(data_cfg.seq_len) + 1)


def work_units(files: list[str], column: str) -> list[tuple[str, int]]:
  """(file, row group) for parquet files (footers read in parallel), (file, -1) for the others."""
  parquet = [f for f in files if documents.file_format(f) == "parquet"]
  with ThreadPoolExecutor(max_workers=16) as pool:
    groups = dict(zip(parquet, pool.map(lambda f: documents.parquet_row_groups(f, column), parquet)))
  units: list[tuple[str, int]] = []
  for f in files:
    units += [(f, rg) for rg in range(groups[f])] if f in groups else [(f, -1)]
  return units


def read_unit(column: str, text_split: str, unit, start: int):
  """Raw documents of one work unit from document `start` on."""
  path, rg = unit
  if rg < 0:
    return documents.read_raw(path, column, text_split, start)
  it = documents.read_parquet(path, column, [rg])
  for _ in range(start):
    next(it, None)
  return it


def make_iter_dataset(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int,
                      process_index: int, process_count: int) -> grain.IterDataset | None:
  """The train split's rows of this process (None for the eval split, which is index-addressable)."""
  need(split in SPLITS, "split", split, f"expected one of {SPLITS}")
  if split != "train":
    return None
  info(data_cfg)
  files = documents.expand(data_cfg.path)
  units = work_units(files, data_cfg.column)
  ds = stream.PackedRowsIterDataset(
      units, functools.partial(read_unit, data_cfg.column, data_cfg.get("text_split", "line")),
      tokenizer=data_cfg.tokenizer, tokenizer_path=data_cfg.get("tokenizer_path", ""),
      row_len=int(data_cfg.seq_len) + 1, context_length=data_cfg.get("context_length", -1),
      seed=seed, process_index=process_index, process_count=process_count,
      num_epochs=int(data_cfg.get("num_epochs", 0)), shuffle_units=bool(data_cfg.get("shuffle_files", True)),
      chunk_docs=int(data_cfg.get("chunk_docs", 256)))
  window = int(data_cfg.get("shuffle_window", 0))
  need(window >= 0, "data.shuffle_window", window, "must be >= 0")
  if window > 1:
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=window, seed=(seed * 7919 + process_index) % (2**31 - 1))
  return ds


@functools.lru_cache(maxsize=4)
def _eval_rows(eval_path: str, column: str, text_split: str, tokenizer: str, tokenizer_path: str,
               row_len: int, eval_rows: int, context_length: int) -> tuple:
  files = documents.expand(eval_path)
  texts = documents.iter_documents(files, documents.Stats(), column, text_split)
  tok = tokenizers.load(tokenizer, tokenizer_path)
  return tuple(stream.rows_in_memory(texts, tok, row_len, eval_rows, context_length))


def make_source(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int):
  """The eval split: the first data.eval_rows packed rows of data.eval_path, in memory."""
  del seed  # held-out rows are read in file order
  need(split in SPLITS, "split", split, f"expected one of {SPLITS}")
  need(split == "eval", "split", split,
       f"data.name={data_cfg.name!r} streams its train split: use pipeline.make_dataset")
  need(bool(data_cfg.eval_path), "data.eval_path", data_cfg.eval_path,
       "the eval split needs held-out files (or set eval_every=0)")
  overlap = set(documents.expand(data_cfg.eval_path)) & set(documents.expand(data_cfg.path))
  need(not overlap, "data.eval_path", data_cfg.eval_path, f"overlaps data.path: {sorted(overlap)[:3]}")
  return list(_eval_rows(data_cfg.eval_path, data_cfg.column, data_cfg.get("text_split", "line"),
                         data_cfg.tokenizer, data_cfg.get("tokenizer_path", ""),
                         int(data_cfg.seq_len) + 1, int(data_cfg.eval_rows),
                         int(data_cfg.get("context_length", -1))))
