"""Pre-tokenized ArrayRecord shards (written by `nextlat prepare`) as an index-addressable source.

`data.name = 'pretokenized'`, `data.path = DIR` (holding manifest.json and the shards). Row i of the
train split, epoch e = i // N, is stored row perm_e(i mod N), where perm_e is grain's index_shuffle
(a seeded bijection of [0, N), no table in memory) keyed by (seed, e); N = the train rows. So the rows
of step s on process p are a pure function of (seed, s, p, process count) and a run resumes from the
step alone, on any number of processes. Only int32 tokens are stored; segment ids, positions and the
loss mask are derived at read time (nextlat_jax.data.packing).

The source's `tokenizer` is the text tokenizer of the rows (the folder's copy, named in the manifest).

Eval split: the first data.eval_rows rows (0: all) of another prepared DIR `data.eval_path`, or, if
that is empty, the LAST data.eval_rows rows of data.path, which the train split then leaves out.
"""
from __future__ import annotations

import functools
import json
import os

import grain
import ml_collections
import numpy as np

from nextlat_jax.data import packing, tokenizers
from nextlat_jax.data.pipeline import SPLITS, DatasetInfo, need

MANIFEST = "manifest.json"
FORMAT = "nextlat-pretokenized-v1"


def default_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="pretokenized",
      path="",  # a directory written by `nextlat prepare`
      eval_path="",  # another prepared directory for the eval split ("" = hold out rows of path)
      eval_rows=0,  # eval rows (first of eval_path, 0 = all; or the last of path, then required)
      seq_len=0,  # 0: the manifest's; otherwise it must equal it
      context_length=-1,  # no prompt masking in pretraining
      num_epochs=1,  # passes over the train rows, each with its own permutation
  ))


@functools.lru_cache(maxsize=16)
def _manifest(directory: str, mtime_ns: int) -> dict:
  del mtime_ns  # part of the cache key: a rewritten manifest is read again
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise ValueError(f"data.path={directory!r}: no {MANIFEST} (not a finished `nextlat prepare` output)")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable manifest ({e})") from None
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  for shard in manifest["shards"]:
    if not os.path.isfile(os.path.join(directory, shard["file"])):
      raise ValueError(f"{path}: shard {shard['file']} is missing")
  return manifest


def manifest(directory: str) -> dict:
  """The manifest of a prepared directory (checked: format, every shard present)."""
  directory = os.path.abspath(directory)
  try:
    mtime_ns = os.stat(os.path.join(directory, MANIFEST)).st_mtime_ns
  except OSError:
    mtime_ns = -1
  return _manifest(directory, mtime_ns)


def manifest_tokenizer(directory: str) -> tokenizers.Tokenizer | None:
  """The tokenizer of a prepared directory: its copy in the folder (manifest `tokenizer_copy`, relative,
  so the folder can be moved), else the absolute `tokenizer_path` of older manifests, else (gpt2) the
  installed / cached GPT-2 files; None for a manifest without a tokenizer."""
  directory = os.path.abspath(directory)
  m = manifest(directory)
  if not m.get("tokenizer"):
    return None
  path = os.path.join(directory, m["tokenizer_copy"]) if m.get("tokenizer_copy") else m.get("tokenizer_path", "")
  return tokenizers.load(m["tokenizer"], path)


def info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  need(bool(data_cfg.path), "data.path", data_cfg.path, "give a directory written by `nextlat prepare`")
  m = manifest(data_cfg.path)
  seq_len = int(data_cfg.get("seq_len", 0))
  need(seq_len in (0, m["seq_len"]), "data.seq_len", seq_len,
       f"the rows in {data_cfg.path} have seq_len={m['seq_len']} (0 takes the manifest's)")
  return DatasetInfo(vocab_size=m["vocab_size"], eos_id=m["eos_id"], pad_id=m["eos_id"],
                     row_len=m["seq_len"] + 1)


def epoch_seed(seed: int, epoch: int) -> int:
  """The uint32 key of epoch `epoch`'s permutation."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class PretokenizedSource(grain.sources.RandomAccessDataSource):
  """Rows [lo, hi) of a prepared directory, `num_epochs` times, each epoch permuted (seed None: in
  order), as dicts in the batch contract."""

  def __init__(self, directory: str, lo: int, hi: int, *, seed: int | None, num_epochs: int,
               context_length: int | None):
    m = manifest(directory)
    self._directory = os.path.abspath(directory)
    self._files = [os.path.join(self._directory, s["file"]) for s in m["shards"]]
    self._lo, self._n = lo, hi - lo
    self._row_len, self._eos = m["seq_len"] + 1, m["eos_id"]
    self._epochs, self._context_length = num_epochs, context_length
    self._seeds = None if seed is None else [epoch_seed(seed, e) for e in range(num_epochs)]
    self._records = None

  def __len__(self) -> int:
    return self._n * self._epochs

  @property
  def tokenizer(self) -> tokenizers.Tokenizer | None:
    """The text tokenizer the rows were prepared with (read on first use; see `manifest_tokenizer`)."""
    return manifest_tokenizer(self._directory)

  def row_index(self, i: int) -> int:
    """The stored row (index into the prepared directory) behind source index i."""
    if not 0 <= i < len(self):
      raise IndexError(f"row {i} out of range [0, {len(self)})")
    epoch, j = divmod(i, self._n)
    if self._seeds is not None and self._n > 1:
      j = grain.experimental.index_shuffle(j, max_index=self._n - 1, seed=self._seeds[epoch], rounds=4)
    return self._lo + j

  def _read(self, rows: list[int]) -> np.ndarray:
    """(len(rows), row_len) int32 tokens of stored rows (read in parallel by ArrayRecord)."""
    if self._records is None:
      self._records = grain.sources.ArrayRecordDataSource(self._files)
    records = self._records.__getitems__(rows) if len(rows) > 1 else [self._records[rows[0]]]
    for k, r in zip(rows, records):
      if len(r) != 4 * self._row_len:
        raise ValueError(f"{self._files}: row {k} has {len(r)} bytes, expected {4 * self._row_len}")
    return np.frombuffer(b"".join(records), dtype=np.int32).reshape(len(rows), self._row_len)

  def tokens(self, i: int) -> np.ndarray:
    return self._read([self.row_index(int(i))])[0]

  def __getitem__(self, i: int) -> dict:
    return packing.pack_row_fields(self.tokens(int(i)), self._eos, self._context_length)

  def get_batch(self, indices) -> dict:
    """The rows of source indices `indices` stacked: dict of (len(indices), row_len) int32."""
    tokens = self._read([self.row_index(int(i)) for i in indices])
    return packing.pack_row_fields(tokens, self._eos, self._context_length)

  def __repr__(self) -> str:
    return f"PretokenizedSource(rows={self._n}, epochs={self._epochs}, files={len(self._files)})"


def make_source(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int) -> PretokenizedSource:
  """The train split (permuted by seed, num_epochs passes) or the eval split (in order)."""
  need(split in SPLITS, "split", split, f"expected one of {SPLITS}")
  info(data_cfg)
  m = manifest(data_cfg.path)
  rows = m["rows"]
  need(rows > 0, "data.path", data_cfg.path,
       f"holds 0 rows ({m.get('documents', 0)} documents were prepared); prepare more text")
  held = int(data_cfg.get("eval_rows", 0))
  need(held >= 0, "data.eval_rows", held, "must be >= 0")
  eval_path = data_cfg.get("eval_path", "")
  context_length = data_cfg.get("context_length", -1)
  if split == "train":
    epochs = int(data_cfg.get("num_epochs", 1))
    need(epochs >= 1, "data.num_epochs", epochs, "must be >= 1")
    hi = rows if eval_path else rows - held
    need(hi >= 1, "data.eval_rows", held, f"holds out all {rows} rows of data.path={data_cfg.path!r}; lower "
         "data.eval_rows or set data.eval_path")
    return PretokenizedSource(data_cfg.path, 0, hi, seed=seed, num_epochs=epochs,
                              context_length=context_length)
  if eval_path:
    m = manifest(eval_path)
    need(m["seq_len"] == manifest(data_cfg.path)["seq_len"] and m["tokenizer"] == manifest(data_cfg.path)["tokenizer"],
         "data.eval_path", eval_path, "was prepared with another seq_len or tokenizer than data.path")
    n = m["rows"] if held == 0 else min(held, m["rows"])
    return PretokenizedSource(eval_path, 0, n, seed=None, num_epochs=1, context_length=context_length)
  need(0 < held < rows, "data.eval_rows", held,
       f"without data.eval_path the eval split is the last eval_rows of the {rows} rows of "
       f"data.path={data_cfg.path!r}; need 0 < eval_rows < {rows}")
  return PretokenizedSource(data_cfg.path, rows - held, rows, seed=None, num_epochs=1,
                            context_length=context_length)
