"""TinyStories end to end on a generated corpus: prepare trains the 1k-style byte-level BPE and packs
rows at a fixed stride across stories; the config trains; `nextlat eval` runs the 20 probes."""
import json

import numpy as np
import pytest

from nextlat_jax.config import load_config_file
from nextlat_jax.data import tokenizers
from nextlat_jax.data.prepare import prepare
from nextlat_jax.data.sources import pretokenized


NAMES = ["Lily", "Tom", "Max", "Sue", "Ben", "Mia"]
THINGS = ["a red ball", "a big dog", "a small cat", "a blue kite", "a tall tree", "a happy bird"]
VERBS = ["found", "saw", "liked", "lost", "wanted", "shared"]


def stories(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    who, what, verb = rng.choice(NAMES), rng.choice(THINGS), rng.choice(VERBS)
    out.append(f"Once upon a time, {who} {verb} {what}. {who} was very happy. "
               f"The end of the day came and {who} went home with {what}.")
  return out


def _config(arg):
  return load_config_file("tinystories", arg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("ts")
  texts = stories(600)
  with open(root / "train.jsonl", "w") as f:
    for t in texts[:500]:
      f.write(json.dumps({"text": t}) + "\n")
    f.write(json.dumps({"text": "   "}) + "\n")  # empty: skipped and counted
  with open(root / "val.jsonl", "w") as f:
    for t in texts[500:]:
      f.write(json.dumps({"text": t}) + "\n")
  m = prepare(str(root / "train.jsonl"), str(root / "train"), seq_len=64, tokenizer="bpe", train_bpe=300,
              bpe_train_docs=400, progress=False)
  tok_path = str(root / "train" / "tokenizer.json")
  v = prepare(str(root / "val.jsonl"), str(root / "val"), seq_len=64, tokenizer="bpe", tokenizer_path=tok_path,
              progress=False)
  return root, texts, m, v


def test_prepare_trains_the_bpe_and_packs_stories_at_a_fixed_stride(corpus):
  root, texts, m, v = corpus
  tok = tokenizers.BPETokenizer.load(str(root / "train" / "tokenizer.json"))
  assert tok.vocab_size == 300 and m["vocab_size"] == 300 and m["eos_id"] == tok.eos_id == 0
  assert m["tokenizer_path"] == str(root / "train" / "tokenizer.json")
  assert m["documents"] == 500 and m["skipped"] == 1 and m["seq_len"] == 64
  # the token stream: every story then one EOS, cut into 65-token rows, the tail dropped
  stream = np.concatenate([np.asarray(tok.encode(t) + [tok.eos_id]) for t in texts[:500]])
  assert m["rows"] == len(stream) // 65 and m["dropped_tail_tokens"] == len(stream) % 65
  src = pretokenized.PretokenizedSource(str(root / "train"), 0, m["rows"], seed=None, num_epochs=1,
                                        context_length=None)
  rows = np.stack([src[i]["tokens"] for i in range(m["rows"])])
  np.testing.assert_array_equal(rows.reshape(-1), stream[:m["rows"] * 65])
  assert tok.decode(tok.encode(texts[0])) == texts[0]  # byte-level: lossless
  # the validation corpus reuses the train tokenizer, and a rerun reuses the trained file
  assert v["tokenizer_path"] == m["tokenizer_path"] and v["vocab_size"] == 300
  m2 = prepare(str(root / "train.jsonl"), str(root / "train"), seq_len=64, tokenizer="bpe", train_bpe=300,
               progress=False)
  assert m2["rows"] == m["rows"]


def test_bad_bpe_requests_name_the_flag(tmp_path, corpus):
  root = corpus[0]
  with pytest.raises(ValueError, match="--train_bpe=300: needs --tokenizer=bpe"):
    prepare(str(root / "train.jsonl"), str(tmp_path / "x"), tokenizer="gpt2", train_bpe=300, progress=False)
  with pytest.raises(ValueError, match="--train_bpe=100: must be >= 258"):
    prepare(str(root / "train.jsonl"), str(tmp_path / "y"), tokenizer="bpe", train_bpe=100, progress=False)


def test_config_presets_read_like_the_paper():
  c = _config("nextlat,d8")
  assert (c.model.n_layer, c.model.d_model, c.model.n_head, c.dynamics.hidden) == (8, 768, 8, 2048)
  assert (c.steps, c.batch_size, c.data.seq_len, c.objective.horizon) == (100_000, 256, 256, 8)
  assert (c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.grad_clip) == (3e-4, 0.1, 1.0)
  assert _config("gpt").objective.name == "gpt" and c.eval_task == "probes"
  with pytest.raises(ValueError, match="'d0'"):
    _config("d0")


def test_train_then_eval_runs_the_probes(corpus, tmp_path):
  from nextlat_jax.eval.run import evaluate_task
  from nextlat_jax.train.trainer import train
  root = corpus[0]
  c = _config("nextlat,tiny")
  c.steps, c.eval_every, c.checkpoint.every = 20, 0, 20
  c.data.update(path=str(root / "train"), eval_path=str(root / "val"), eval_rows=0)
  train(c, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0]
  out = evaluate_task(str(tmp_path), show_progress=False, batch_size=8, rank_batches=1,
                      options={"probe_steps": 5, "probe_val_batches": 1})
  assert sorted(out["probes"]["probe_ce"]) == list(range(1, 21))
  assert all(np.isfinite(v) and 0 < v < 2 * np.log(300) for v in out["probes"]["probe_ce"].values())
  assert (tmp_path / "eval" / "probes.json").exists() and (tmp_path / "eval" / "probe_ce.png").exists()
