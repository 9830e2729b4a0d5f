"""Documents -> tokens -> packed rows as a checkpointable grain IterDataset (the streaming path).

The corpus is a list of work units (a parquet row group, a whole jsonl/text file, a range of a TFDS
split). Every epoch the unit list is permuted by (seed, epoch) and process p of P reads units p, p+P,
... of that order. A process tokenizes its documents, appends an EOS after each one and cuts its own
token stream into contiguous rows of `row_len` tokens (the tail of a row carries into the next
document; nothing between rows is lost). Rows come out in the batch contract (nextlat_jax.data.packing).

Iterator state (exact for the same process layout): the position where the current chunk of
`chunk_docs` documents started (epoch, unit, document, carried tokens, counts) and the number of rows
of that chunk already returned; restoring re-reads and re-tokenizes that chunk. Rows depend on the
process count, so a stream cannot be resumed on a different number of processes.
"""
from __future__ import annotations

import copy
import itertools
import weakref
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from nextlat_jax.data import packing, tokenizers
from nextlat_jax.data.sources import documents

ReadUnit = Callable[[Any, int], Iterator]  # (unit, first document) -> raw documents of the unit


def pack_tokens(carry: np.ndarray, docs: Sequence[Sequence[int]], eos_id: int, row_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """(rows (n, row_len) int32, new carry): `carry` then each document followed by one EOS, cut."""
  total = len(carry) + sum(len(d) + 1 for d in docs)
  stream = np.empty(total, dtype=np.int32)
  stream[:len(carry)] = carry
  stream[len(carry):] = np.fromiter(itertools.chain.from_iterable(
      itertools.chain(d, (eos_id,)) for d in docs), dtype=np.int32, count=total - len(carry))
  n = total // row_len
  return stream[:n * row_len].reshape(n, row_len), stream[n * row_len:]


def units_of_process(num_units: int, seed: int, epoch: int, process_index: int, process_count: int,
                     shuffle: bool = True) -> list[int]:
  """Indices of the units process p reads in `epoch`: every P-th of the epoch's seeded order."""
  order = (np.random.default_rng([seed, epoch]).permutation(num_units) if shuffle
           else np.arange(num_units))
  return [int(u) for u in order[process_index::process_count]]


class PackedRowsIterDataset(grain.IterDataset):
  """Packed rows (dicts in the batch contract) of process `process_index`; `num_epochs` 0 = forever."""

  def __init__(self, units: Sequence[Any], read_unit: ReadUnit, *, tokenizer: str, tokenizer_path: str,
               row_len: int, context_length: int | None, seed: int, process_index: int,
               process_count: int, num_epochs: int = 0, shuffle_units: bool = True,
               chunk_docs: int = 256, name: str = "data.path"):
    super().__init__()
    if len(units) < process_count:
      raise ValueError(f"{name}: {len(units)} work units (row groups / files) cannot be split over "
                       f"{process_count} processes; give more files or fewer processes")
    self.units, self.read_unit = list(units), read_unit
    tokenizers.load(tokenizer, tokenizer_path)  # missing tokenizer files: refused here, not in a reader thread
    self.tokenizer, self.tokenizer_path = tokenizer, tokenizer_path
    self.row_len, self.context_length = row_len, context_length
    self.seed, self.process_index, self.process_count = seed, process_index, process_count
    self.num_epochs, self.shuffle_units, self.chunk_docs = num_epochs, shuffle_units, chunk_docs

  def __iter__(self) -> "PackedRowsIterator":
    it = PackedRowsIterator(self)
    self._live = weakref.ref(it)
    return it

  def live_stats(self) -> dict:
    """Counts of the newest iterator so far (documents, skipped, invalid_utf8_replaced, tokens, rows;
    documents read ahead into a shuffle window or prefetch buffer included)."""
    it = self._live() if getattr(self, "_live", None) else None
    return dict(it._pos["stats"]) if it is not None else {}  # noqa: SLF001

  def __str__(self) -> str:
    return f"PackedRowsIterDataset(units={len(self.units)}, row_len={self.row_len})"


def _fresh_position() -> dict:
  stats = dict(documents=0, skipped=0, invalid_utf8_replaced=0, tokens=0, rows=0)
  return dict(epoch=0, unit=0, doc=0, carry=[], stats=stats)


class PackedRowsIterator(grain.DatasetIterator):
  """Iterator of `PackedRowsIterDataset`; `get_state()` is JSON-serialisable."""

  def __init__(self, ds: PackedRowsIterDataset):
    super().__init__()
    self._ds = ds
    self._tok = tokenizers.load(ds.tokenizer, ds.tokenizer_path)
    self._restart(_fresh_position())

  def _restart(self, position: dict) -> None:
    self._pos = copy.deepcopy(position)  # where reading continues
    self._chunk_start = copy.deepcopy(position)  # where the current chunk began
    self._rows: list[np.ndarray] = []
    self._emitted = 0
    self._docs: Iterator | None = None  # raw documents of the current unit
    self._epoch_units: tuple[int, list[int]] | None = None

  def _units(self, epoch: int) -> list[int]:
    if self._epoch_units is None or self._epoch_units[0] != epoch:
      d = self._ds
      self._epoch_units = (epoch, units_of_process(len(d.units), d.seed, epoch, d.process_index,
                                                   d.process_count, d.shuffle_units))
    return self._epoch_units[1]

  def _read_texts(self) -> list[str]:
    """Up to chunk_docs non-empty documents from the current position; [] at the end of the data."""
    d, pos, texts = self._ds, self._pos, []
    stats = documents.Stats(**{k: pos["stats"][k] for k in ("documents", "skipped",
                                                             "invalid_utf8_replaced")})
    while len(texts) < d.chunk_docs:
      units = self._units(pos["epoch"])
      if pos["unit"] >= len(units):
        if d.num_epochs and pos["epoch"] + 1 >= d.num_epochs:
          break
        pos.update(epoch=pos["epoch"] + 1, unit=0, doc=0)
        continue
      if self._docs is None:
        self._docs = d.read_unit(d.units[units[pos["unit"]]], pos["doc"])
      raw = next(self._docs, _END)
      if raw is _END:
        pos.update(unit=pos["unit"] + 1, doc=0)
        self._docs = None
        continue
      pos["doc"] += 1
      text = documents.decode(raw, stats)
      if text is not None:
        texts.append(text)
    pos["stats"].update(stats.as_dict())
    return texts

  def _next_chunk(self) -> bool:
    self._chunk_start = copy.deepcopy(self._pos)
    self._emitted = 0
    texts = self._read_texts()
    if not texts:
      return False
    ids = self._tok.encode_batch(texts)
    rows, carry = pack_tokens(np.asarray(self._pos["carry"], np.int32), ids, self._tok.eos_id,
                              self._ds.row_len)
    self._pos["carry"] = carry.tolist()
    self._pos["stats"]["tokens"] += sum(len(i) + 1 for i in ids)
    self._pos["stats"]["rows"] += len(rows)
    self._rows = list(rows[::-1])
    return True

  def __next__(self) -> dict:
    while not self._rows:
      if not self._next_chunk():
        raise StopIteration
    self._emitted += 1
    tokens = self._rows.pop()
    return packing.pack_row_fields(tokens, self._tok.eos_id, self._ds.context_length)

  def get_state(self) -> dict:
    return dict(chunk=copy.deepcopy(self._chunk_start), emitted=self._emitted,
                stats=dict(self._pos["stats"]))

  def set_state(self, state: dict) -> None:
    self._restart(state["chunk"])
    if state["emitted"]:  # re-read the chunk and drop the rows already returned
      self._next_chunk()
      for _ in range(state["emitted"]):
        self._rows.pop()
      self._emitted = state["emitted"]

  def __str__(self) -> str:
    return "PackedRowsIterator"


_END = object()


def rows_in_memory(texts: Iterator[str], tokenizer: tokenizers.Tokenizer, row_len: int,
                   max_rows: int, context_length: int | None) -> list[dict]:
  """The first `max_rows` packed rows of a document stream (held-out splits), in the batch contract."""
  out: list[dict] = []
  carry = np.zeros((0,), np.int32)
  while len(out) < max_rows:
    chunk = list(itertools.islice(texts, 256))
    if not chunk:
      break
    rows, carry = pack_tokens(carry, tokenizer.encode_batch(chunk), tokenizer.eos_id, row_len)
    out += [packing.pack_row_fields(r, tokenizer.eos_id, context_length) for r in rows]
  return out[:max_rows]
