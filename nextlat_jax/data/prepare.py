"""Tokenize + pack a corpus into ArrayRecord shards of fixed-length rows (`nextlat prepare`, whose flags
are in nextlat_jax.data.prepare_cli).

  nextlat prepare --input=/data/fineweb-edu/sample/100BT --output=/data/fwedu_gpt2_1024 \
      [--seq_len=1024 --tokenizer=gpt2 --tokenizer_path=DIR --workers=16]
  nextlat prepare --input=tfds:my_dataset --tfds_split=train --output=DIR
  nextlat prepare --input=/data/TinyStories2-ascii/train --output=DIR --seq_len=256 \
      --tokenizer=bpe --train_bpe=1000          # trains DIR/tokenizer.json first (1k byte-level BPE)

Input: parquet / jsonl / text files (a file, folder, glob or fsspec URL; comma-separated), or a TFDS
dataset with an ArrayRecord data source (`tfds:NAME`). One output shard per input file (per
`--docs_per_shard` records for TFDS), written by parallel worker processes. In each shard the
documents are tokenized in file order, each followed by one EOS, and the stream is cut into rows of
seq_len + 1 int32 tokens (one ArrayRecord record per row, group_size 1 for random access); the tail
shorter than a row is dropped and counted (`dropped_tail_tokens`).

Resumable: a shard is written to `<name>.partial`, renamed when complete, and then marked done by
`<name>.done.json` (its counts). A rerun with the same settings skips marked shards and redoes the
others; a rerun with other settings stops with an error. manifest.json (rows, tokens, documents,
skipped, invalid_utf8_replaced, dropped_tail_tokens, tokenizer, seq_len, shards with their row
counts) is written last, so a directory with a manifest is complete.

--train_bpe=N (with --tokenizer=bpe) first trains a byte-level BPE of N tokens (specials <|eos|>,
<|pad|>) on the first --bpe_train_docs documents of the input, in input order, and saves it to
--tokenizer_path (default OUTPUT/tokenizer.json); an existing file there is reused, so a rerun resumes
with the same tokenizer.

Empty or too-small input (no document, or no shard that fills one row) is refused before anything is
written. The folder keeps a copy of its tokenizer (bpe: tokenizer.json; gpt2: tokenizer/ with
encoder.json, vocab.bpe and special_tokens.json), named in the manifest relative to the folder
(`tokenizer_copy`), so runs and exports find it also after the folder was moved.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Iterator

import numpy as np

from nextlat_jax.data import tokenizers
from nextlat_jax.data.sources import documents, stream
from nextlat_jax.data.sources.pretokenized import FORMAT, MANIFEST
from nextlat_jax.errors import need_output_folder

ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access to single rows
CHUNK_DOCS = 1024  # documents tokenized per batch inside a worker
_SETTINGS = "prepare.json"


def work_units(inputs: str, tfds_split: str, tfds_data_dir: str, docs_per_shard: int) -> list[dict]:
  """One dict per output shard: {'file': path} or {'tfds': name, 'split', 'data_dir', 'start', 'stop'}."""
  if inputs.startswith("tfds:"):
    from nextlat_jax.data.sources import tfds_source
    name = inputs[len("tfds:"):]
    n = len(tfds_source.data_source(name, tfds_split, tfds_data_dir))
    return [dict(tfds=name, split=tfds_split, data_dir=tfds_data_dir, start=lo, stop=min(lo + docs_per_shard, n))
            for lo in range(0, n, docs_per_shard)]
  files = documents.expand(inputs)
  for f in files:
    documents.file_format(f)
  return [dict(file=f) for f in files]


def _raw_documents(unit: dict, column: str, text_split: str) -> Iterator:
  if "file" in unit:
    return documents.read_raw(unit["file"], column, text_split)
  from nextlat_jax.data.sources import tfds_source
  source = tfds_source.data_source(unit["tfds"], unit["split"], unit["data_dir"])
  tfds_source.check_column(source, unit["tfds"], column)
  return tfds_source.read_records(unit["tfds"], unit["split"], unit["data_dir"], column, unit["start"], unit["stop"])


def shard_name(i: int, n: int) -> str:
  return f"shard-{i:05d}-of-{n:05d}.array_record"


def write_shard(job: tuple) -> dict:
  """Tokenizes, packs and writes one shard; returns (and marks done with) its counts."""
  from array_record.python.array_record_module import ArrayRecordWriter
  i, n, unit, out_dir, s = job
  tok = tokenizers.load(s["tokenizer"], s["tokenizer_path"])
  if hasattr(tok, "num_threads"):
    tok.num_threads = s["threads"]
  final = os.path.join(out_dir, shard_name(i, n))
  partial = final + ".partial"
  row_len = s["seq_len"] + 1
  stats = documents.Stats()
  carry = np.zeros((0,), np.int32)
  rows = doc_tokens = 0
  writer = ArrayRecordWriter(partial, ARRAY_RECORD_OPTIONS)
  try:
    texts: list[str] = []
    raw_docs = _raw_documents(unit, s["column"], s["text_split"])
    for raw in _with_end(raw_docs):
      text = documents.decode(raw, stats) if raw is not _END else None
      if text is not None:
        texts.append(text)
      if texts and (len(texts) >= CHUNK_DOCS or raw is _END):
        ids = tok.encode_batch(texts)
        doc_tokens += sum(len(x) + 1 for x in ids)
        packed, carry = stream.pack_tokens(carry, ids, tok.eos_id, row_len)
        for row in packed:
          writer.write(row.tobytes())
        rows += len(packed)
        texts = []
  finally:
    writer.close()
  os.replace(partial, final)
  source = unit["file"] if "file" in unit else f"tfds:{unit['tfds']}/{unit['split']}[{unit['start']}:{unit['stop']}]"
  done = dict(file=shard_name(i, n), source=source, rows=rows, tokens=rows * row_len,
              dropped_tail_tokens=doc_tokens - rows * row_len, **stats.as_dict())
  _write_json(final[:-len(".array_record")] + ".done.json", done)
  return done


_END = object()


def _with_end(it: Iterator) -> Iterator:
  yield from it
  yield _END


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _check_settings(out_dir: str, settings: dict) -> None:
  path = os.path.join(out_dir, _SETTINGS)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for key in settings:
      if old.get(key) != settings[key]:
        raise ValueError(f"{out_dir}: prepared with {key}={old.get(key)!r}, this run has {key}={settings[key]!r}; "
                         "use another --output or delete it")
  else:
    _write_json(path, settings)


def _check_output(output: str) -> None:
  """Refuses an --output that is a file or a training run's folder (it holds checkpoints/ or metrics.jsonl);
  a folder of an unfinished prepare is resumed."""
  need_output_folder("--output", output)


def prepare(inputs: str, output: str, *, seq_len: int = 1024, tokenizer: str = "gpt2",
            tokenizer_path: str = "", column: str = "text", text_split: str = "line", workers: int = 1,
            tfds_split: str = "train", tfds_data_dir: str = "", docs_per_shard: int = 100_000,
            progress: bool = True, train_bpe: int = 0, bpe_train_docs: int = 200_000) -> dict:
  """Writes (or finishes) the shards and the manifest in `output`; returns the manifest."""
  _check_output(output)
  if seq_len < 1:
    raise ValueError(f"--seq_len={seq_len}: must be >= 1")
  if text_split not in documents.TEXT_SPLITS:
    raise ValueError(f"--text_split={text_split!r}: expected one of {documents.TEXT_SPLITS}")
  if workers < 1:
    raise ValueError(f"--workers={workers}: must be >= 1")
  if train_bpe and tokenizer != "bpe":
    raise ValueError(f"--train_bpe={train_bpe}: needs --tokenizer=bpe (got {tokenizer!r})")
  if train_bpe:
    tokenizer_path = tokenizer_path or os.path.join(output, "tokenizer.json")
  # Fail before any work on missing tokenizer files (a BPE still to be trained is loaded once trained).
  tok = None if train_bpe and not os.path.exists(tokenizer_path) else tokenizers.load(tokenizer, tokenizer_path)
  units = work_units(inputs, tfds_split, tfds_data_dir, docs_per_shard)
  check_enough_data(units, tok, column, text_split, seq_len + 1)
  os.makedirs(output, exist_ok=True)
  if tok is None:
    train_tokenizer(units, tokenizer_path, train_bpe, bpe_train_docs, column, text_split)
    tok = tokenizers.load(tokenizer, tokenizer_path)
    check_enough_data(units, tok, column, text_split, seq_len + 1)
  vocab_size, eos_id = tok.vocab_size, tok.eos_id
  settings = dict(units=units, seq_len=seq_len, tokenizer=tokenizer, column=column, text_split=text_split)
  _check_settings(output, settings)
  copy = copy_tokenizer(tok, tokenizer_path, output)
  n = len(units)
  done: dict[int, dict] = {}
  for i in range(n):
    marker = os.path.join(output, shard_name(i, n)[:-len(".array_record")] + ".done.json")
    if os.path.exists(marker) and os.path.exists(os.path.join(output, shard_name(i, n))):
      with open(marker) as f:
        done[i] = json.load(f)
  worker_settings = dict(settings, tokenizer_path=os.path.join(output, copy) if copy else tokenizer_path,
                         threads=max(1, (os.cpu_count() or 1) // workers))
  jobs = [(i, n, units[i], output, worker_settings) for i in range(n) if i not in done]
  bar = _progress_bar(n, len(done), progress)
  t0, new_tokens = time.perf_counter(), 0

  def record(result: dict) -> None:
    nonlocal new_tokens
    done[int(result["file"].split("-")[1])] = result
    new_tokens += result["tokens"]
    bar.update(1)
    bar.set_postfix(tokens=f"{new_tokens:.3g}", tok_per_s=f"{new_tokens / (time.perf_counter() - t0):.3g}")

  if workers == 1 or len(jobs) <= 1:
    for job in jobs:
      record(write_shard(job))
  else:
    # A worker that dies (killed, out of memory) raises BrokenProcessPool here instead of hanging.
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
      futures = [pool.submit(write_shard, job) for job in jobs]
      try:
        for future in as_completed(futures):
          record(future.result())
      except BaseException:
        for future in futures:
          future.cancel()
        raise
  bar.close()
  shards = [done[i] for i in range(n)]
  total = lambda key: sum(s[key] for s in shards)
  manifest = dict(
      format=FORMAT, rows=total("rows"), tokens=total("tokens"), documents=total("documents"),
      skipped=total("skipped"), invalid_utf8_replaced=total("invalid_utf8_replaced"),
      dropped_tail_tokens=total("dropped_tail_tokens"), tokenizer=tokenizer, vocab_size=vocab_size,
      eos_id=eos_id, seq_len=seq_len, row_len=seq_len + 1, dtype="int32", input=inputs,
      tokenizer_path=os.path.abspath(tokenizer_path) if tokenizer_path else "", tokenizer_copy=copy,
      shards=shards)
  _write_json(os.path.join(output, MANIFEST), manifest)
  return manifest


def _describe(units: list[dict]) -> str:
  """The input files (or TFDS splits) of `units`, at most three named."""
  names = list(dict.fromkeys(u["file"] if "file" in u else f"tfds:{u['tfds']}/{u['split']}" for u in units))
  return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])}, ... ({len(names)} files)"


def check_enough_data(units: list[dict], tok: tokenizers.Tokenizer | None, column: str, text_split: str,
                      row_len: int) -> None:
  """ValueError (one line) unless some shard gets at least one row of `row_len` tokens (tok None: one
  document). Reads until one does, which is usually the first documents."""
  stats = documents.Stats()
  most = 0
  for unit in units:
    tokens = 0
    for raw in _raw_documents(unit, column, text_split):
      text = documents.decode(raw, stats)
      if text is None:
        continue
      if tok is None:
        return
      tokens += len(tok.encode(text)) + 1  # + its EOS
      if tokens >= row_len:
        return
    most = max(most, tokens)
  where = _describe(units)
  if stats.documents == 0:
    skipped = f" ({stats.skipped} empty ones skipped)" if stats.skipped else ""
    raise ValueError(f"0 documents read from {where}{skipped}; nothing to prepare")
  raise ValueError(f"{stats.documents} documents read from {where} give at most {most} tokens per shard "
                   f"(EOS included), fewer than one row of seq_len + 1 = {row_len}; lower --seq_len or add text")


def _copy_file(src: str, dst: str) -> None:
  """Copies src to dst atomically; an existing dst must already hold the same bytes."""
  if os.path.exists(dst) and os.path.samefile(src, dst):
    return
  with open(src, "rb") as f:
    data = f.read()
  if os.path.exists(dst):
    with open(dst, "rb") as f:
      if f.read() != data:
        raise ValueError(f"{dst} differs from {src}: this folder was prepared with another tokenizer; "
                         "use another --output or delete it")
    return
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with open(dst + ".partial", "wb") as f:
    f.write(data)
  os.replace(dst + ".partial", dst)


def copy_tokenizer(tok: tokenizers.Tokenizer, tokenizer_path: str, output: str) -> str:
  """Keeps a copy of the tokenizer in `output` (bpe: tokenizer.json; gpt2: tokenizer/ with encoder.json,
  vocab.bpe, special_tokens.json); returns its path relative to `output`, "" when there are no files
  (GPT-2 from tiktoken's registry with its cache off)."""
  if tok.name == "bpe":
    _copy_file(tokenizer_path, os.path.join(output, "tokenizer.json"))
    return "tokenizer.json"
  files = getattr(tok, "files", None)
  if files is None:
    print("prepare: the GPT-2 files are not on disk (tiktoken's cache is off); the folder keeps no "
          "tokenizer copy", file=sys.stderr)
    return ""
  folder = os.path.join(output, "tokenizer")
  for src, name in zip(files, tokenizers.GPT2_FILE_NAMES[0]):
    _copy_file(src, os.path.join(folder, name))
  specials = os.path.join(folder, tokenizers.SPECIAL_TOKENS_FILE)
  if not os.path.exists(specials):
    _write_json(specials, tok.special_tokens)
  return "tokenizer"


def train_tokenizer(units: list[dict], path: str, vocab_size: int, max_docs: int, column: str,
                    text_split: str) -> None:
  """Trains a byte-level BPE on the first `max_docs` non-empty documents of `units`; saves it atomically."""
  if vocab_size < 258:
    raise ValueError(f"--train_bpe={vocab_size}: must be >= 258 (256 bytes + 2 specials)")
  stats = documents.Stats()

  def texts() -> Iterator[str]:
    n = 0
    for unit in units:
      for raw in _raw_documents(unit, column, text_split):
        text = documents.decode(raw, stats)
        if text is not None:
          yield text
          n += 1
          if n >= max_docs:
            return

  tok = tokenizers.BPETokenizer.train(texts(), vocab_size=vocab_size)
  if stats.documents == 0:
    raise ValueError(f"--train_bpe: no non-empty documents in {[u.get('file', u) for u in units][:3]}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.save(path + ".partial")
  os.replace(path + ".partial", path)
  print(f"prepare: trained a {tok.vocab_size}-token BPE on {stats.documents} documents -> {path}", file=sys.stderr)


def _progress_bar(total: int, initial: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit="shard", desc="prepare", disable=not enabled,
              file=sys.stderr, dynamic_ncols=True)
