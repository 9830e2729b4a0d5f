"""The real-text flow of docs/text.md, offline, on generated English-like text, command by command as a
user types it: prepare (a parquet corpus, a trained BPE) -> train (configs/text_small.py:tiny) -> eval ->
generate --prompt=TEXT -> export-hf -> transformers (model and tokenizer) -> lm-eval on a local task."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import CPU_FAST_COMPILE, REPO

WORDS = {"adj": ["red", "small", "old", "quiet", "bright", "cold"],
         "noun": ["cat", "dog", "river", "house", "garden", "ship", "tree", "bird"],
         "verb": ["sees", "follows", "finds", "paints", "hears", "leaves"]}


def corpus(n_docs: int, seed: int = 0) -> list[str]:
  """Documents of 3-6 sentences `The ADJ NOUN VERB the ADJ NOUN.` (a few hundred distinct words in all)."""
  rng = np.random.default_rng(seed)
  pick = lambda kind: WORDS[kind][rng.integers(len(WORDS[kind]))]
  docs = []
  for _ in range(n_docs):
    sentences = [f"The {pick('adj')} {pick('noun')} {pick('verb')} the {pick('adj')} {pick('noun')}."
                 for _ in range(rng.integers(3, 7))]
    docs.append(" ".join(sentences))
  return docs


def nextlat(*args: str, env: dict) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", "nextlat_jax.cli", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"nextlat {' '.join(args)}\n{proc.stderr[-3000:]}"
  return proc


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory) -> dict:
  home = tmp_path_factory.mktemp("home")
  env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", HF_HOME=str(home / "hf"))
  env["XLA_FLAGS"] = CPU_FAST_COMPILE  # one CPU device, as a user runs it
  return env


def test_prepare_train_eval_generate_export_lm_eval(tmp_path: pathlib.Path, offline_env: dict):
  import pyarrow as pa
  import pyarrow.parquet as pq
  docs = corpus(400)
  pq.write_table(pa.table({"text": docs}), tmp_path / "books.parquet")

  nextlat("prepare", f"--input={tmp_path / 'books.parquet'}", f"--output={tmp_path / 'data'}", "--seq_len=32",
          "--tokenizer=bpe", "--train_bpe=300", env=offline_env)
  manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
  assert manifest["rows"] > 100 and manifest["vocab_size"] <= 300

  run = tmp_path / "run"
  nextlat("train", "--config=configs/text_small.py:tiny", f"--workdir={run}", f"--config.data.path={tmp_path / 'data'}",
          env=offline_env)
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "eval_loss" in r] == [10, 20]

  nextlat("eval", f"--workdir={run}", env=offline_env)
  held_out = json.loads((run / "eval_20.json").read_text())
  assert np.isfinite(held_out["eval_loss"])

  out = nextlat("generate", f"--workdir={run}", "--prompt=The red cat", "--max_new_tokens=8", "--temperature=0",
                env=offline_env)
  line = json.loads(out.stdout.splitlines()[0])
  assert line["prompt"] == "The red cat" and line["text"] == line["prompt"] + line["output"], line
  assert line["new_tokens"] >= 1 and line["tokens_per_sec"] > 0

  hf = tmp_path / "hf"
  nextlat("export-hf", f"--workdir={run}", f"--out={hf}", env=offline_env)
  assert all(oct(os.stat(hf / f).st_mode & 0o777) == "0o644" for f in os.listdir(hf) if (hf / f).is_file())
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  tok = AutoTokenizer.from_pretrained(hf)
  model = AutoModelForCausalLM.from_pretrained(hf)
  assert model.config.max_position_embeddings == 33
  ids = tok(docs[0])["input_ids"]
  assert tok.decode(ids) == docs[0]
  with torch.no_grad():
    logits = model(torch.tensor([ids[:16]])).logits
  assert torch.isfinite(logits).all()

  lm = nextlat("lm-eval", f"--workdir={run}", f"--include_path={REPO / 'configs' / 'lm_eval'}",
               "--tasks=nextlat_local_text", env=offline_env)
  results = list((run / "lm_eval").glob("results_step*.json"))
  assert len(results) == 1, lm.stdout[-2000:]
  scores = json.loads(results[0].read_text())
  assert "nextlat_local_text" in json.dumps(scores)
