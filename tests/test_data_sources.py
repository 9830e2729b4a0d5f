"""Text data sources: pre-tokenized (index-addressable, elastic), FineWeb-style streaming, TFDS,
evaluation corpora, bad input, configs."""
import collections
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nextlat_jax.data import packing, pipeline, prepare, tokenizers
from nextlat_jax.data.sources import eval_corpora, fineweb, pretokenized, stream, tfds_source

GPT2_DIR = tokenizers.bundled_gpt2_dir()
EOS = 50256


def docs(n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  words = "the cat sat on a mat while lazy dogs ran past school and learned".split()
  return [f"doc {seed}-{i}: " + " ".join(rng.choice(words, rng.integers(1, 30))) for i in range(n)]


def tokens_of(texts) -> list[int]:
  tok = tokenizers.load("gpt2", GPT2_DIR)
  return [t for text in texts for t in tok.encode(text) + [EOS]]


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("fw")
  texts = {}
  for i in range(4):
    texts[i] = docs(48, i)
    pq.write_table(pa.table({"text": texts[i]}), d / f"{i:03d}_00000.parquet", row_group_size=16)
  return d, texts


@pytest.fixture(scope="module")
def prepared(parquet_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("prep")
  m = prepare.prepare(str(parquet_dir[0]), str(out), seq_len=16, tokenizer_path=GPT2_DIR, progress=False)
  return out, m


def stored_rows(directory) -> np.ndarray:
  src = pretokenized.PretokenizedSource(str(directory), 0, pretokenized.manifest(str(directory))["rows"],
                                        seed=None, num_epochs=1, context_length=-1)
  return np.stack([src.tokens(i) for i in range(len(src))])


def pretok_cfg(path, **kw):
  cfg = pretokenized.default_data_config()
  cfg.path = str(path)
  cfg.update(kw)
  return cfg


def make(cfg, batch, p=0, count=1, split="train", seed=0):
  return pipeline.make_dataset(cfg, split=split, global_batch_size=batch, seed=seed, process_index=p,
                               process_count=count)


def as_keys(rows) -> list[bytes]:
  return [r.tobytes() for r in rows]


# --- pre-tokenized ---------------------------------------------------------------------------------

def test_pretokenized_info_and_contract(prepared):
  out, m = prepared
  cfg = pretok_cfg(out)
  assert pipeline.dataset_info(cfg) == pipeline.DatasetInfo(50257, EOS, EOS, 17)
  batch = make(cfg, 8)[3]
  assert set(batch) == set(packing.FIELDS) and batch["tokens"].shape == (8, 17)
  for key, value in packing.pack_row_fields(batch["tokens"], EOS, -1).items():
    np.testing.assert_array_equal(batch[key], value)
  source = pipeline.make_source(cfg, split="train", seed=0)  # whole-batch reads == row by row
  for key in packing.FIELDS:
    np.testing.assert_array_equal(batch[key], np.stack([source[i][key] for i in range(24, 32)]))
  with pytest.raises(ValueError, match=r"data\.seq_len=32: the rows .* have seq_len=16"):
    pipeline.dataset_info(pretok_cfg(out, seq_len=32))
  with pytest.raises(ValueError, match=r"no manifest\.json"):
    pipeline.dataset_info(pretok_cfg(out / "nowhere"))


@pytest.mark.parametrize("count", [1, 2, 4])
def test_pretokenized_epoch_sees_every_row_once(prepared, count):
  out, m = prepared
  rows = m["rows"]
  held = 4 + rows % 4  # train rows divisible by the global batch of 4
  cfg = pretok_cfg(out, eval_rows=held)
  parts = [make(cfg, 4, p, count) for p in range(count)]
  seen = [r for part in parts for s in range(len(part)) for r in as_keys(part[s]["tokens"])]
  corpus = as_keys(stored_rows(out)[:rows - held])
  assert len(seen) == len(corpus) and collections.Counter(seen) == collections.Counter(corpus)
  evals = as_keys(make(cfg, held, split="eval")[0]["tokens"])
  assert evals == as_keys(stored_rows(out)[rows - held:])  # held out, in order, never trained on


def test_pretokenized_order_depends_only_on_seed_and_step(prepared):
  out, _ = prepared
  cfg = pretok_cfg(out, num_epochs=2)
  whole = make(cfg, 8)
  halves = [make(cfg, 8, p, 2) for p in range(2)]
  for s in (0, 7, len(whole) - 1):
    np.testing.assert_array_equal(np.concatenate([h[s]["tokens"] for h in halves]), whole[s]["tokens"])
  assert not np.array_equal(make(cfg, 8, seed=1)[0]["tokens"], whole[0]["tokens"])
  source = pipeline.make_source(cfg, split="train", seed=0)
  n = len(source) // 2
  order = [source.row_index(i) for i in range(2 * n)]
  assert sorted(order[:n]) == sorted(order[n:]) == list(range(n))  # each epoch: every row once
  assert order[:n] != order[n:] and order[:n] != list(range(n))  # ... in its own shuffled order


def test_pretokenized_iterator_state_restores_exactly(prepared):
  out, _ = prepared
  cfg = pretok_cfg(out)
  layout = dict(process_index=0, process_count=1)
  it = pipeline.BatchIterator(make(cfg, 4), 0, layout)
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it)["tokens"] for _ in range(6)]
  again = pipeline.BatchIterator(make(cfg, 4), 0, layout)
  again.set_state(state)
  assert again.step == 5
  for w in want:
    np.testing.assert_array_equal(next(again)["tokens"], w)


def test_pretokenized_elastic_resume_two_processes_to_one(prepared):
  out, m = prepared
  held = 4 + m["rows"] % 4
  cfg = pretok_cfg(out, eval_rows=held)
  s = 7
  its = [pipeline.BatchIterator(make(cfg, 4, p, 2), 0, dict(process_index=p, process_count=2)) for p in range(2)]
  consumed = [r for _ in range(s) for it in its for r in as_keys(next(it)["tokens"])]
  states = [json.loads(it.get_state()) for it in its]
  assert {st["step"] for st in states} == {s}
  one = pipeline.BatchIterator(make(cfg, 4), 0, dict(process_index=0, process_count=1))
  with pytest.raises(ValueError, match=r"saved with process_count=2, this run has process_count=1"):
    one.set_state(its[0].get_state())
  one.seek(states[0]["step"])  # what the trainer does when the layout changed: the step decides
  rest = [r for batch in one for r in as_keys(batch["tokens"])]
  corpus = as_keys(stored_rows(out)[:m["rows"] - held])
  assert len(consumed) + len(rest) == len(corpus)
  assert collections.Counter(consumed + rest) == collections.Counter(corpus)


def test_packing_segments_restart_at_every_eos(prepared):
  out, _ = prepared
  batch = make(pretok_cfg(out), 16)[0]
  tok, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
  assert (tok == EOS).any()
  for b in range(tok.shape[0]):
    for t in range(tok.shape[1]):
      if tok[b, t] == EOS:
        assert pos[b, t] == 0 and seg[b, t] == (seg[b, t - 1] + 1 if t else 1)
      else:
        assert pos[b, t] == (pos[b, t - 1] + 1 if t else 1) and seg[b, t] == (seg[b, t - 1] if t else 0)
  assert (batch["loss_mask"][:, 0] == 0).all() and (batch["loss_mask"][:, 1:] == 1).all()


# --- streaming -------------------------------------------------------------------------------------

def stream_cfg(path, **kw):
  cfg = fineweb.default_data_config()
  cfg.update(path=str(path), tokenizer_path=GPT2_DIR, seq_len=16, chunk_docs=8, shuffle_window=8)
  cfg.update(kw)
  return cfg


def test_stream_state_restores_exactly(parquet_dir):
  cfg = stream_cfg(parquet_dir[0])
  layout = dict(process_index=1, process_count=2)
  it = pipeline.BatchIterator(make(cfg, 4, 1, 2), 0, layout)
  for _ in range(37):  # past several chunks, shuffle windows and an epoch boundary
    next(it)
  state = it.get_state()
  want = [next(it)["tokens"] for _ in range(40)]
  again = pipeline.BatchIterator(make(cfg, 4, 1, 2), 0, layout)
  again.set_state(state)
  assert again.step == 37
  for w in want:
    np.testing.assert_array_equal(next(again)["tokens"], w)
  assert it.stats()["documents"] > 2 * 48  # this process's half of the corpus, and more: epoch 2
  with pytest.raises(ValueError, match=r"cannot jump to step 5"):
    pipeline.BatchIterator(make(cfg, 4, 1, 2), 5, layout)
  restarted = pipeline.BatchIterator(make(stream_cfg(parquet_dir[0], reposition="restart"), 4, 1, 2), 5, layout)
  fresh = pipeline.BatchIterator(make(cfg, 4, 1, 2), 0, layout)
  np.testing.assert_array_equal(next(restarted)["tokens"], next(fresh)["tokens"])


@pytest.mark.parametrize("count", [1, 2, 4])
def test_stream_processes_partition_the_corpus(parquet_dir, count):
  d, texts = parquet_dir
  cfg = stream_cfg(d, num_epochs=1, shuffle_window=0)
  files = sorted(str(p) for p in d.glob("*.parquet"))
  units = fineweb.work_units(files, "text")
  assert len(units) == 12
  seen_units = []
  for p in range(count):
    mine = stream.units_of_process(len(units), 0, 0, p, count)
    seen_units += mine
    want = tokens_of([t for u in mine for t in texts[files.index(units[u][0])][16 * units[u][1]:16 * (units[u][1] + 1)]])
    rows = [r for b in make(cfg, 4, p, count) for r in b["tokens"]]
    got = np.concatenate(rows).tolist()
    assert got == want[:len(got)] and len(want) - len(got) < 17 * (4 // count)  # contiguous rows
  assert sorted(seen_units) == list(range(12))  # every row group read by exactly one process


def test_stream_counts_empty_and_invalid_documents(tmp_path):
  values = [b"good one", b"", b"bad \xff byte", b"   ", b"good two"] * 4
  pq.write_table(pa.table({"text": pa.array(values, pa.binary()).view(pa.string())}),
                 tmp_path / "x.parquet", row_group_size=5)
  it = pipeline.BatchIterator(make(stream_cfg(tmp_path, seq_len=2, num_epochs=1, shuffle_window=0), 1), 0, {})
  rows = [b["tokens"][0] for b in it]
  want = tokens_of(["good one", "bad \ufffd byte", "good two"] * 4)
  assert it.stats() == dict(documents=12, skipped=8, invalid_utf8_replaced=4, tokens=len(want), rows=len(want) // 3)
  assert np.concatenate(rows).tolist() == want[:3 * len(rows)] and len(rows) == len(want) // 3


def test_stream_bad_input_and_eval_split(parquet_dir, tmp_path):
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
  with pytest.raises(ValueError, match=r"nocol\.parquet: no column 'text'"):
    make(stream_cfg(tmp_path), 4)
  (tmp_path / "nocol.parquet").unlink()
  (tmp_path / "trunc.parquet").write_bytes((parquet_dir[0] / "000_00000.parquet").read_bytes()[:300])
  with pytest.raises(ValueError, match=r"trunc\.parquet: unreadable parquet file"):
    make(stream_cfg(tmp_path), 4)
  d, texts = parquet_dir
  cfg = stream_cfg(f"{d}/00[0-2]_*.parquet", eval_path=str(d / "003_00000.parquet"), eval_rows=8)
  ev = make(cfg, 4, split="eval")
  assert len(ev) == 2
  np.testing.assert_array_equal(np.concatenate([ev[0]["tokens"], ev[1]["tokens"]]).reshape(-1),
                                tokens_of(texts[3])[:8 * 17])
  with pytest.raises(ValueError, match=r"data\.eval_path=.*overlaps data\.path"):
    make(stream_cfg(d, eval_path=str(d / "003_00000.parquet")), 4, split="eval")


# --- TFDS ------------------------------------------------------------------------------------------

def _tiny_builder(data_dir):
  import tensorflow_datasets as tfds

  class NextlatTinyCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(docs(40, 7)), "validation": self._generate_examples(docs(10, 8))}

    def _generate_examples(self, texts):
      for i, t in enumerate(texts):
        yield i, {"text": t}

  builder = NextlatTinyCorpus(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder.name


def test_tfds_source_without_tensorflow(tmp_path):
  import importlib.util
  assert importlib.util.find_spec("tensorflow") is None  # the point: TFDS's ArrayRecord path needs no TF
  name = _tiny_builder(tmp_path)
  cfg = tfds_source.default_data_config()
  cfg.update(tfds_name=name, data_dir=str(tmp_path), tokenizer_path=GPT2_DIR, seq_len=16, docs_per_unit=10,
             shuffle_window=0, num_epochs=1, eval_split="validation", eval_rows=4)
  source = tfds_source.data_source(name, "train", str(tmp_path))
  records = [r["text"].decode() for r in source.__getitems__(list(range(len(source))))]
  assert sorted(records) == sorted(docs(40, 7))
  rows = np.concatenate([b["tokens"] for b in make(cfg, 2)]).reshape(-1)
  units = stream.units_of_process(4, 0, 0, 0, 1)
  want = tokens_of([records[i] for u in units for i in range(10 * u, 10 * u + 10)])
  assert rows.tolist() == want[:len(rows)] and len(want) - len(rows) < 2 * 17
  ev = make(cfg, 4, split="eval")[0]["tokens"].reshape(-1).tolist()
  val = tfds_source.data_source(name, "validation", str(tmp_path))
  assert ev == tokens_of([r["text"].decode() for r in val.__getitems__(list(range(len(val))))])[:4 * 17]
  m = prepare.prepare(f"tfds:{name}", str(tmp_path / "prep"), seq_len=16, tokenizer_path=GPT2_DIR,
                      tfds_data_dir=str(tmp_path), docs_per_shard=25, progress=False)
  assert len(m["shards"]) == 2 and m["documents"] == 40
  with pytest.raises(ValueError, match=r"data\.column='body'"):
    pipeline.dataset_info(_with(cfg, column="body"))


def _with(cfg, **kw):
  cfg = cfg.copy_and_resolve_references()
  cfg.update(kw)
  return cfg


# --- evaluation corpora ----------------------------------------------------------------------------

def test_wikitext_detokenizer_rules():
  raw = (" = Valkyria = \n The 1 @,@ 000 @-@ page guide ( see below ) costs 3 @.@ 5 $ . "
         "It was \" great \" , they said ; N players ! \n = = Plot = = \n 20 ° C [ a ] { b } ' c ' ? \n")
  want = (" = Valkyria =\nThe 1,000-page guide (see below) costs 3.5 $. "
          "It was \"great\", they said; 1 players!\n== Plot ==\n20°C [a] {b} 'c'?\n")
  assert eval_corpora.wikitext_detokenizer(raw) == want
  assert eval_corpora.wikitext_detokenizer("dogs ' toys = = = = x") == "dogs' toys ==== x"
  assert eval_corpora.wikitext_detokenizer("The game 's guide") == "The game's guide"
  # lm-eval's quote rule pairs the apostrophe of "'s" with the next quote (reproduced, not fixed):
  assert eval_corpora.wikitext_detokenizer("it 's a ' b ' c") == "it's a' b ' c"
  assert eval_corpora.wikitext_words(raw) == len(raw.split()) + 2  # leading/trailing empty strings


def test_wikitext_pages_from_raw_and_parquet(tmp_path):
  raw = (" \n = Alpha = \n \n Alpha text . \n \n = = Section = = \n \n More . \n \n"
         " = Beta = \n \n Beta text . \n \n")
  (tmp_path / "wiki.test.raw").write_text(raw)
  pages = list(eval_corpora.wikitext_pages(str(tmp_path / "wiki.test.raw")))
  assert len(pages) == 2 and pages[0].startswith(" \n = Alpha = ") and "= = Section = =" in pages[0]
  assert pages[1].startswith(" = Beta = ") and "\n".join(pages) == raw
  pq.write_table(pa.table({"page": pages}), tmp_path / "test.parquet")
  assert list(eval_corpora.wikitext_pages(str(tmp_path / "test.parquet"))) == pages


def test_lambada_and_fineweb_validation(tmp_path):
  lines = ["he said he would bring the dog", "the last word is target"]
  (tmp_path / "lambada_test.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
  assert list(eval_corpora.lambada(str(tmp_path / "lambada_test.jsonl"))) == [
      ("he said he would bring the", " dog"), ("the last word is", " target")]
  pq.write_table(pa.table({"text": ["a", "", "b"]}), tmp_path / "val.parquet")
  assert list(eval_corpora.fineweb_validation(str(tmp_path / "val.parquet"))) == ["a", "b"]


# --- configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fineweb_edu_stream", "fineweb_edu_pretok"])
def test_configs_resolve_and_validate(name, parquet_dir, prepared):

  import jax

  from nextlat_jax import config as config_lib
  from nextlat_jax.train import preflight
  config = config_lib.load_config_file(name)
  config.data.path = str(parquet_dir[0] if name.endswith("stream") else prepared[0])
  resolved, info = preflight.resolve(config)
  config_lib.validate(resolved, jax.device_count(), data_vocab=info.vocab_size)
  assert resolved.data.eos_id == EOS and resolved.model.vocab_size == 50304
  with pytest.raises(config_lib.ConfigError, match=r"data\.path"):
    preflight.resolve(config_lib.load_config_file(name))


def test_trainer_logs_stream_counts(tmp_path):
  """End to end: `nextlat train` on a parquet stream with bad rows writes the skip counts to metrics."""
  import sys

  from nextlat_jax.train import trainer
  from tests.conftest import REPO
  values = [b"good one two three", b"", b"bad \xff byte here", b"   ", b"good four five six"] * 40
  pq.write_table(pa.table({"text": pa.array(values, pa.binary()).view(pa.string())}),
                 tmp_path / "x.parquet", row_group_size=20)
  sys.path.insert(0, str(REPO / "configs"))
  import fineweb_edu_stream  # noqa: E402
  c = fineweb_edu_stream.get_config()
  c.data.update(path=str(tmp_path / "x.parquet"), tokenizer_path=GPT2_DIR, seq_len=16, chunk_docs=8,
                shuffle_window=8)
  c.model.update(d_model=32, n_layer=1, n_head=2, dtype="float32")
  c.dynamics.hidden = 64
  c.update(steps=4, batch_size=8, log_every=2, eval_every=0)
  c.optimizer.update(warmup_steps=1, decay_steps=2)
  c.checkpoint.every = 0
  c.mesh.update(data=8, fsdp=1, tensor=1)
  c.train.sharding_canary = False  # tests/test_canary.py; here only the stream counts matter
  trainer.train(c, str(tmp_path / "run"))
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  counts = [r for r in rows if "data_skipped" in r]
  assert [r["step"] for r in counts] == [2, 4]
  assert counts[-1]["data_skipped"] > 0 and counts[-1]["data_invalid_utf8_replaced"] > 0
  assert counts[-1]["data_documents"] >= counts[-1]["data_invalid_utf8_replaced"]


def test_train_refuses_too_few_prepared_rows_before_writing(prepared, tmp_path):
  """Fewer rows than eval_rows + one batch: one-line ConfigErrors naming data.path, data.eval_rows and
  the row count, raised before the workdir exists."""
  import sys

  from nextlat_jax import config as config_lib
  from nextlat_jax.train import trainer
  from tests.conftest import REPO
  sys.path.insert(0, str(REPO / "configs"))
  import fineweb_edu_pretok  # noqa: E402
  rows = prepared[1]["rows"]
  c = fineweb_edu_pretok.get_config()
  c.data.update(path=str(prepared[0]), eval_rows=rows - 4)
  c.model.update(d_model=32, n_layer=1, n_head=2, dtype="float32")
  c.dynamics.hidden = 64
  c.update(steps=2, batch_size=8, eval_every=0)
  c.optimizer.update(warmup_steps=1, decay_steps=1)
  c.checkpoint.every = 0
  c.mesh.update(data=8, fsdp=1, tensor=1)
  c.train.sharding_canary = False
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError) as e:
    trainer.train(c, str(workdir))
  msg = str(e.value)
  assert "\n" not in msg and "data.num_rows=4: fewer rows than one global batch (global_batch_size=8)" in msg
  assert f"data.path={str(prepared[0])!r}" in msg and f"data.eval_rows={rows - 4}" in msg
  c.data.eval_rows = rows
  with pytest.raises(config_lib.ConfigError, match=rf"data\.eval_rows={rows}: holds out all {rows} rows of "
                                                   rf"data\.path='{prepared[0]}'"):
    trainer.train(c, str(workdir))
  empty = tmp_path / "empty"  # written by an older `nextlat prepare`, which accepted an empty input
  empty.mkdir()
  (empty / "manifest.json").write_text(json.dumps(dict(prepared[1], rows=0, tokens=0, documents=0, shards=[])))
  c.data.update(path=str(empty), eval_rows=16)
  with pytest.raises(config_lib.ConfigError, match=r"data\.path='.*empty': holds 0 rows \(0 documents were "
                                                   r"prepared\); prepare more text \(data\.eval_rows=16\)$"):
    trainer.train(c, str(workdir))
  assert not workdir.exists()
