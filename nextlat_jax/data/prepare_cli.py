"""`nextlat prepare --input=... --output=DIR`: the command module of nextlat_jax.data.prepare (its flags;
only `nextlat prepare` imports it)."""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from nextlat_jax.data.prepare import prepare

flags.DEFINE_string("input", None, "Corpus files / folder / glob / URL (comma-separated), or tfds:NAME.")
flags.DEFINE_string("output", None, "Output directory (created; a rerun resumes).")
flags.DEFINE_integer("seq_len", 1024, "Rows hold seq_len + 1 tokens.")
flags.DEFINE_string("tokenizer", "gpt2", "The tokenizer: gpt2 | bpe.")
flags.DEFINE_string("tokenizer_path", "", "The tokenizer files; gpt2: folder with encoder.json + vocab.bpe; "
                    "bpe: tokenizer.json.")
flags.DEFINE_integer("train_bpe", 0, "With --tokenizer=bpe: first train a byte-level BPE of this many "
                     "tokens on the input and save it to --tokenizer_path (default OUTPUT/tokenizer.json).")
flags.DEFINE_integer("bpe_train_docs", 200_000, "With --train_bpe: documents to train the BPE on.")
flags.DEFINE_string("column", "text", "Parquet column / jsonl key / TFDS feature of the text.")
flags.DEFINE_string("text_split", "line", "Documents of .txt files: line | paragraph | file.")
flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 1)), "Worker processes.")
flags.DEFINE_string("tfds_split", "train", "The TFDS split (with --input=tfds:NAME).")
flags.DEFINE_string("tfds_data_dir", "", "The TFDS data_dir (with --input=tfds:NAME).")
flags.DEFINE_integer("docs_per_shard", 100_000, "TFDS records per output shard.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  f = FLAGS
  if not f.input or not f.output:
    raise app.UsageError("prepare needs --input and --output")
  try:
    m = prepare(f.input, f.output, seq_len=f.seq_len, tokenizer=f.tokenizer, tokenizer_path=f.tokenizer_path,
                column=f.column, text_split=f.text_split, workers=f.workers, tfds_split=f.tfds_split,
                tfds_data_dir=f.tfds_data_dir, docs_per_shard=f.docs_per_shard, train_bpe=f.train_bpe,
                bpe_train_docs=f.bpe_train_docs)
  except ValueError as e:
    print(f"prepare: {e}", file=sys.stderr)
    sys.exit(2)
  summary = {k: v for k, v in m.items() if k != "shards"}
  print(json.dumps(dict(summary, shards=len(m["shards"])), indent=1))
