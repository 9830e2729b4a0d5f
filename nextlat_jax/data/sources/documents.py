"""Text corpora -> documents: parquet / jsonl / text files on any fsspec filesystem, with counts.

A corpus is a file, a directory (every .parquet / .jsonl / .json / .txt / .raw file below it, optionally
.gz), a glob, or a comma-separated list of those; URLs such as `hf://datasets/...` or `gs://...` work
wherever fsspec has the protocol installed.

Bad input: a missing column or key, an unreadable, truncated or non-JSON file raises ValueError naming
the file. Documents that are empty or whitespace-only are skipped and counted; invalid UTF-8 is
replaced (U+FFFD) and counted, once per document. A document of a text file is one line
(text_split="line", the default), a blank-line separated paragraph ("paragraph") or the whole file
("file").
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Sequence

import fsspec

SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".raw": "text"}
TEXT_SPLITS = ("line", "paragraph", "file")


@dataclasses.dataclass
class Stats:
  """Document counts of a read: `documents` are the non-empty ones that were kept."""

  documents: int = 0
  skipped: int = 0
  invalid_utf8_replaced: int = 0

  def add(self, other: "Stats") -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def decode(raw: bytes | str | None, stats: Stats) -> str | None:
  """The document text, or None (counted) when it is empty; invalid UTF-8 is replaced (counted)."""
  if isinstance(raw, (bytes, bytearray, memoryview)):
    try:
      raw = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
      raw = bytes(raw).decode("utf-8", errors="replace")
      stats.invalid_utf8_replaced += 1
  if raw is None or not raw.strip():
    stats.skipped += 1
    return None
  stats.documents += 1
  return raw


def file_format(path: str) -> str:
  """'parquet' | 'jsonl' | 'text' from the file name (a trailing .gz is ignored)."""
  name = path[:-3] if path.endswith(".gz") else path
  fmt = SUFFIXES.get(os.path.splitext(name)[1].lower())
  if fmt is None:
    raise ValueError(f"{path}: unknown corpus file type; expected one of {sorted(SUFFIXES)} (optionally .gz)")
  return fmt


def expand(spec: str | Sequence[str]) -> list[str]:
  """The corpus files named by `spec` (files, directories, globs; comma-separated), sorted per item."""
  items = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s]
  if not items:
    raise ValueError("data.path='': no corpus given")
  out: list[str] = []
  for item in items:
    fs, _, paths = fsspec.get_fs_token_paths(item)
    found: list[str] = []
    for p in paths:
      if fs.isdir(p):
        found += [f for f in fs.find(p) if _known(f)]
      elif fs.exists(p):
        found.append(p)
    if not found:
      raise ValueError(f"{item}: no corpus files found (looked for {sorted(SUFFIXES)})")
    out += [fs.unstrip_protocol(p) if "://" in item else p for p in sorted(found)]
  return out


def _known(path: str) -> bool:
  name = path[:-3] if path.endswith(".gz") else path
  return os.path.splitext(name)[1].lower() in SUFFIXES


def open_file(path: str, mode: str = "rb"):
  return fsspec.open(path, mode, compression="infer" if path.endswith(".gz") else None)


def _parquet_file(path: str, column: str):
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    handle = open_file(path).open()
    pf = pq.ParquetFile(handle)
  except (OSError, pa.ArrowException) as e:
    raise ValueError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None
  if column not in pf.schema_arrow.names:
    raise ValueError(f"{path}: no column {column!r} (columns: {pf.schema_arrow.names})")
  return pf


def parquet_row_groups(path: str, column: str) -> int:
  """Number of row groups of a parquet file (its footer is read and the column checked)."""
  return _parquet_file(path, column).metadata.num_row_groups


def read_parquet(path: str, column: str, row_groups: Sequence[int] | None = None) -> Iterator[bytes | None]:
  """The raw values (UTF-8 bytes) of `column`, row group by row group."""
  import pyarrow as pa
  pf = _parquet_file(path, column)
  for rg in range(pf.metadata.num_row_groups) if row_groups is None else row_groups:
    try:
      col = pf.read_row_group(rg, columns=[column]).column(column)
      if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = col.cast(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary())
      values = col.to_pylist()
    except (OSError, pa.ArrowException) as e:
      raise ValueError(f"{path}: unreadable row group {rg} ({type(e).__name__}: {e})") from None
    yield from values


def read_jsonl(path: str, key: str) -> Iterator[bytes | str | None]:
  """The `key` field of each JSON line; blank lines are ignored."""
  try:
    with open_file(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: invalid JSON line ({e.msg}; truncated file?)") from None
        if not isinstance(record, dict) or key not in record:
          raise ValueError(f"{path}:{n}: no key {key!r} in this JSON line")
        yield _bytes_if_not_utf8(record[key])
  except OSError as e:
    raise ValueError(f"{path}: unreadable file ({type(e).__name__}: {e})") from None


def _bytes_if_not_utf8(value):
  """A JSON string that held invalid UTF-8 (or lone surrogates) -> bytes, for `decode` to count."""
  if not isinstance(value, str):
    return value
  try:
    value.encode("utf-8")
    return value
  except UnicodeEncodeError:
    try:
      return value.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
      return value.encode("utf-8", errors="surrogatepass")


def read_text(path: str, text_split: str = "line") -> Iterator[bytes]:
  """Documents of a text file as raw bytes: lines, blank-line separated paragraphs, or the file."""
  if text_split not in TEXT_SPLITS:
    raise ValueError(f"data.text_split={text_split!r}: expected one of {TEXT_SPLITS}")
  try:
    with open_file(path) as f:
      if text_split == "file":
        yield f.read()
        return
      para: list[bytes] = []
      for line in f:
        if text_split == "line":
          yield line.rstrip(b"\r\n")
        elif line.strip():
          para.append(line)
        elif para:
          yield b"".join(para).rstrip(b"\r\n")
          para = []
      if para:
        yield b"".join(para).rstrip(b"\r\n")
  except OSError as e:
    raise ValueError(f"{path}: unreadable file ({type(e).__name__}: {e})") from None


def read_raw(path: str, column: str = "text", text_split: str = "line", start: int = 0
             ) -> Iterator[bytes | str | None]:
  """The raw documents of one file from document `start` on (column/key for parquet and jsonl)."""
  fmt = file_format(path)
  if fmt == "parquet":
    it = read_parquet(path, column)
  elif fmt == "jsonl":
    it = read_jsonl(path, column)
  else:
    it = read_text(path, text_split)
  for i, raw in enumerate(it):
    if i >= start:
      yield raw


def iter_documents(files: Sequence[str], stats: Stats, column: str = "text", text_split: str = "line"
                   ) -> Iterator[str]:
  """The non-empty documents of `files` in order, decoded; counts go to `stats`."""
  for path in files:
    for raw in read_raw(path, column, text_split):
      text = decode(raw, stats)
      if text is not None:
        yield text
