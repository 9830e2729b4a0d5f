"""`nextlat prepare`: packed ArrayRecord shards, manifest counts, bad input, resume after a kill."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nextlat_jax.data import prepare as prepare_lib
from nextlat_jax.data import tokenizers

GPT2_DIR = tokenizers.bundled_gpt2_dir()
SEQ = 16
ROW = SEQ + 1


def docs(n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  words = "the cat sat on a mat while lazy dogs ran past school and learned".split()
  return [f"doc {seed}-{i}: " + " ".join(rng.choice(words, rng.integers(1, 40))) for i in range(n)]


def write_parquet(path, texts, row_group_size=16, column="text"):
  pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path, row_group_size=row_group_size)


def shard_rows(directory, name) -> np.ndarray:
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(os.path.join(directory, name))
  rows = np.stack([np.frombuffer(r, np.int32) for r in reader.read_all()])
  reader.close()
  return rows


def expected_rows(texts) -> tuple[np.ndarray, int]:
  """The rows of one shard by hand: tokens of every document + EOS, cut into rows of ROW; the tail."""
  tok = tokenizers.load("gpt2", GPT2_DIR)
  stream = [t for text in texts for t in tok.encode(text) + [tok.eos_id]]
  n = len(stream) // ROW
  return np.asarray(stream[:n * ROW], np.int32).reshape(n, ROW), len(stream) - n * ROW


def run(inp, out, **kw):
  kw.setdefault("seq_len", SEQ)
  return prepare_lib.prepare(str(inp), str(out), tokenizer_path=GPT2_DIR, progress=False, **kw)


@pytest.fixture
def corpus(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  texts = [docs(50, 0), docs(40, 1), docs(30, 2)]
  for i, t in enumerate(texts):
    write_parquet(d / f"{i:03d}_00000.parquet", t)
  return d, texts


def test_parquet_shards_hold_every_token_in_order(corpus, tmp_path):
  d, texts = corpus
  m = run(d, tmp_path / "out")
  assert [s["file"] for s in m["shards"]] == [f"shard-{i:05d}-of-00003.array_record" for i in range(3)]
  rows_total = tail_total = 0
  for shard, t in zip(m["shards"], texts):
    want, tail = expected_rows(t)
    got = shard_rows(tmp_path / "out", shard["file"])
    np.testing.assert_array_equal(got, want)  # no token lost or reordered between rows
    assert shard["rows"] == len(want) and shard["dropped_tail_tokens"] == tail
    assert shard["documents"] == len(t) and shard["source"].endswith(f"{texts.index(t):03d}_00000.parquet")
    rows_total, tail_total = rows_total + len(want), tail_total + tail
  assert m["rows"] == rows_total and m["tokens"] == rows_total * ROW
  assert (m["documents"], m["skipped"], m["invalid_utf8_replaced"]) == (120, 0, 0)
  assert m["dropped_tail_tokens"] == tail_total
  assert (m["tokenizer"], m["seq_len"], m["row_len"], m["vocab_size"], m["eos_id"]) == ("gpt2", SEQ, ROW, 50257, 50256)
  on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert on_disk == m


def test_jsonl_and_text_with_empty_and_invalid_utf8(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  lines = [json.dumps({"text": "first doc"}).encode(), json.dumps({"text": ""}).encode(),
           b'{"text": "bad \xff\xfe bytes", "n": 1}', json.dumps({"text": "   "}).encode(),
           json.dumps({"text": "last doc"}).encode()]
  (src / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  (src / "b.txt").write_bytes(b"line one\n\nline \xc3\x28 two\nline three\n")
  m = run(src, tmp_path / "out", seq_len=2)
  a, b = m["shards"]
  assert (a["documents"], a["skipped"], a["invalid_utf8_replaced"]) == (3, 2, 1)
  assert (b["documents"], b["skipped"], b["invalid_utf8_replaced"]) == (3, 1, 1)
  assert (m["documents"], m["skipped"], m["invalid_utf8_replaced"]) == (6, 3, 2)
  tok = tokenizers.load("gpt2", GPT2_DIR)
  stream = shard_rows(tmp_path / "out", a["file"]).reshape(-1).tolist()
  want = [t for s in ("first doc", "bad \ufffd\ufffd bytes", "last doc") for t in tok.encode(s) + [50256]]
  assert stream == want[:len(stream)] and len(want) - len(stream) == a["dropped_tail_tokens"] < 3


def test_resume_after_kill_redoes_only_unfinished_shards(corpus, tmp_path, monkeypatch):
  d, _ = corpus
  out = tmp_path / "out"
  first = run(d, out)
  before = {s["file"]: (out / s["file"]).read_bytes() for s in first["shards"]}
  # Simulated kill: shard 1 half-written under its final name without a marker, shard 2 only as a
  # .partial file, and no manifest yet.
  (out / "shard-00001-of-00003.done.json").unlink()
  (out / "shard-00001-of-00003.array_record").write_bytes(before["shard-00001-of-00003.array_record"][:100])
  (out / "shard-00002-of-00003.done.json").unlink()
  os.replace(out / "shard-00002-of-00003.array_record", out / "shard-00002-of-00003.array_record.partial")
  (out / "manifest.json").unlink()
  redone = []
  real = prepare_lib.write_shard
  monkeypatch.setattr(prepare_lib, "write_shard", lambda job: redone.append(job[0]) or real(job))
  second = run(d, out)
  assert sorted(redone) == [1, 2]
  assert second == first
  assert {f: (out / f).read_bytes() for f in before} == before
  assert not list(out.glob("*.partial"))
  redone.clear()
  assert run(d, out) == first and redone == []  # finished: nothing to do
  with pytest.raises(ValueError, match=r"prepared with seq_len=16, this run has seq_len=8"):
    run(d, out, seq_len=8)


def test_parallel_workers_give_the_same_shards(corpus, tmp_path):
  d, _ = corpus
  one = run(d, tmp_path / "one", workers=1)
  two = run(d, tmp_path / "two", workers=2)
  assert two == one
  for s in one["shards"]:
    assert (tmp_path / "one" / s["file"]).read_bytes() == (tmp_path / "two" / s["file"]).read_bytes()


def test_bad_input_names_the_file(tmp_path):
  good = tmp_path / "good.parquet"
  write_parquet(good, docs(5, 0))
  nocol = tmp_path / "nocol.parquet"
  write_parquet(nocol, docs(5, 1), column="content")
  with pytest.raises(ValueError, match=r"nocol\.parquet: no column 'text'"):
    run(f"{good},{nocol}", tmp_path / "o1")
  trunc = tmp_path / "trunc.parquet"
  trunc.write_bytes(good.read_bytes()[:-40])
  with pytest.raises(ValueError, match=r"trunc\.parquet: unreadable parquet file"):
    run(trunc, tmp_path / "o2")
  garbage = tmp_path / "garbage.parquet"
  garbage.write_bytes(b"not parquet at all" * 10)
  with pytest.raises(ValueError, match=r"garbage\.parquet: unreadable parquet file"):
    run(garbage, tmp_path / "o3")
  cut = tmp_path / "cut.jsonl"
  cut.write_text(json.dumps({"text": "a whole line"}) + "\n" + '{"text": "cut in the mid')
  with pytest.raises(ValueError, match=r"cut\.jsonl:2: invalid JSON line"):
    run(cut, tmp_path / "o4")
  nokey = tmp_path / "nokey.jsonl"
  nokey.write_text(json.dumps({"body": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"nokey\.jsonl:1: no key 'text'"):
    run(nokey, tmp_path / "o5")
  with pytest.raises(ValueError, match=r"/no/such/dir: no corpus files found"):
    run("/no/such/dir", tmp_path / "o6")
  for out in ("o1", "o2", "o3", "o4", "o5"):
    assert not (tmp_path / out / "manifest.json").exists()


def test_cli_prepare(tmp_path):
  src = tmp_path / "c.jsonl"
  src.write_text("\n".join(json.dumps({"text": t}) for t in docs(20, 3)) + "\n")
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "nextlat_jax.cli", "prepare", f"--input={src}", f"--output={out}",
         "--seq_len=8", f"--tokenizer_path={GPT2_DIR}", "--workers=1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout)
  manifest = json.loads((out / "manifest.json").read_text())
  assert summary["rows"] == manifest["rows"] > 0 and summary["documents"] == 20
  bad = subprocess.run(cmd[:4] + [f"--input={tmp_path}/none.jsonl"] + cmd[5:], capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and "none.jsonl: no corpus files found" in bad.stderr


# --- empty / too-small input; the folder's own tokenizer copy -------------------------------------

def _tree(directory) -> dict:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_empty_or_too_small_input_is_refused_before_writing(corpus, tmp_path):
  empty = tmp_path / "empty.parquet"
  pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
  with pytest.raises(ValueError, match=r"^0 documents read from .*empty\.parquet; nothing to prepare$"):
    run(empty, tmp_path / "new")
  assert not (tmp_path / "new").exists()
  blank = tmp_path / "blank.jsonl"
  blank.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
  with pytest.raises(ValueError, match=r"0 documents read from .*blank\.jsonl \(2 empty ones skipped\)"):
    run(blank, tmp_path / "new")
  small = tmp_path / "small.jsonl"
  small.write_text(json.dumps({"text": "Hello world"}) + "\n")  # 2 tokens + EOS < one row of 17
  with pytest.raises(ValueError, match=r"1 documents read from .*small\.jsonl give at most 3 tokens per shard"
                                       r" .*fewer than one row of seq_len \+ 1 = 17"):
    run(small, tmp_path / "new")
  assert not (tmp_path / "new").exists()
  assert run(small, tmp_path / "tiny", seq_len=2)["rows"] == 1  # 3 tokens: one row of 3
  d, _ = corpus
  out = tmp_path / "out"
  run(d, out)
  before = _tree(out)
  with pytest.raises(ValueError, match=r"0 documents read from"):
    run(empty, out)
  assert _tree(out) == before  # an existing output untouched


def test_cli_prepare_empty_input_and_no_tokenizer_are_one_line(tmp_path, monkeypatch, capsys):
  """In process: exit 2 and one line on stderr, for empty input and for GPT-2 files found nowhere."""
  from nextlat_jax.data import prepare_cli
  empty = tmp_path / "empty.parquet"
  pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)

  def main(*args: str) -> str:
    prepare_cli.FLAGS(["prepare", *args, "--workers=1"])
    try:
      with pytest.raises(SystemExit) as e:
        prepare_cli.main([])
    finally:
      prepare_cli.FLAGS.unparse_flags()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err

  assert "0 documents read from" in main(f"--input={empty}", f"--output={tmp_path / 'o'}",
                                         f"--tokenizer_path={GPT2_DIR}")
  monkeypatch.setattr(tokenizers, "bundled_gpt2_dir", lambda: str(tmp_path / "nothing"))
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "nothing"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  tokenizers.load.cache_clear()
  try:
    err = main(f"--input={empty}", f"--output={tmp_path / 'o'}")  # the tokenizer is refused first
  finally:
    tokenizers.load.cache_clear()
  assert err.startswith("prepare: the GPT-2 tokenizer needs encoder.json + vocab.bpe") and "--tokenizer_path" in err
  assert not (tmp_path / "o").exists()


def _config_for(folder):
  import ml_collections

  from nextlat_jax.data.sources import pretokenized
  data = pretokenized.default_data_config()
  data.update(path=str(folder), eval_rows=1)
  return ml_collections.ConfigDict(dict(data=data))


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_prepared_folder_keeps_its_tokenizer_and_can_move(kind, tmp_path):
  import shutil

  from nextlat_jax.run import run_tokenizer
  texts = docs(30, 4)
  src = tmp_path / "c.jsonl"
  src.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
  if kind == "bpe":
    path = str(tmp_path / "elsewhere" / "my_bpe.json")
    os.makedirs(os.path.dirname(path))
    tokenizers.BPETokenizer.train(texts, vocab_size=300).save(path)
    files = {"tokenizer.json": path}
  else:
    path = GPT2_DIR
    files = {f"tokenizer/{f}": os.path.join(GPT2_DIR, f) for f in ("encoder.json", "vocab.bpe")}
  out = tmp_path / "out"
  m = prepare_lib.prepare(str(src), str(out), seq_len=SEQ, tokenizer=kind, tokenizer_path=path, progress=False)
  assert (m["tokenizer"], m["tokenizer_copy"]) == (kind, next(iter(files)).split("/")[0])
  for copy, orig in files.items():
    assert (out / copy).read_bytes() == open(orig, "rb").read()
  if kind == "gpt2":
    assert json.loads((out / "tokenizer" / "special_tokens.json").read_text()) == {"<|endoftext|>": 50256}
  want = tokenizers.load(kind, path)
  text = texts[0] + " Zebra 42!"
  moved = tmp_path / "moved"
  shutil.move(str(out), str(moved))
  if kind == "bpe":
    os.remove(path)  # only the copy is left
  tok = run_tokenizer(_config_for(moved))
  assert tok is not None and tok.name == kind
  ids = tok.encode(text)
  assert ids == want.encode(text) and tok.decode(ids) == text
  # The shards hold the tokens of the copy.
  stream = shard_rows(moved, m["shards"][0]["file"]).reshape(-1).tolist()
  assert stream == [t for x in texts for t in tok.encode(x) + [tok.eos_id]][:len(stream)]


def test_older_manifest_falls_back_to_its_absolute_tokenizer_path(tmp_path):
  import shutil

  from nextlat_jax.data.sources import pretokenized
  src = tmp_path / "c.jsonl"
  src.write_text("\n".join(json.dumps({"text": t}) for t in docs(20, 5)) + "\n")
  out = tmp_path / "out"
  m = prepare_lib.prepare(str(src), str(out), seq_len=SEQ, tokenizer_path=GPT2_DIR, progress=False)
  del m["tokenizer_copy"]
  (out / "manifest.json").write_text(json.dumps(m))
  pretokenized._manifest.cache_clear()  # the same mtime on a coarse-clock file system
  shutil.rmtree(out / "tokenizer")
  source = pretokenized.make_source(_config_for(out).data, split="eval", seed=0)
  assert source.tokenizer.encode("Hello world") == [15496, 995]
  m["tokenizer_path"] = str(tmp_path / "gone")
  (out / "manifest.json").write_text(json.dumps(m))
  pretokenized._manifest.cache_clear()
  with pytest.raises(ValueError, match=r"tokenizer_path=.*gone.*encoder\.json not found"):
    pretokenized.make_source(_config_for(out).data, split="eval", seed=0).tokenizer


def test_a_relative_data_path_is_saved_absolute(corpus, tmp_path, monkeypatch):
  """preflight.resolve (what train saves and every reading command loads) makes data.path absolute, so a
  run trained with `--config.data.path=data/books` is read from any directory."""
  from nextlat_jax.train import preflight
  from nextlat_jax.config import load_config_file
  run(corpus[0], tmp_path / "data" / "books")
  monkeypatch.chdir(tmp_path)
  config = load_config_file("text_small", "tiny")
  config.data.update(path="data/books", eval_rows=1, seq_len=SEQ)
  config.batch_size = 1
  resolved, info = preflight.resolve(config, 1)
  assert resolved.data.path == str(tmp_path / "data" / "books") and info.vocab_size > 0
  monkeypatch.chdir(tmp_path / "data")
  assert preflight.resolve(resolved, 1)[0].data.path == resolved.data.path  # elsewhere, the same folder



def test_cli_prepare_refuses_a_file_or_a_run_folder_as_output(tmp_path, capsys):
  """--output an existing file or a training run's folder (checkpoints/ or metrics.jsonl): one line naming
  --output, exit 2, nothing written; an unfinished prepare folder still resumes."""
  from nextlat_jax.data import prepare_cli
  src = tmp_path / "c.jsonl"
  src.write_text("\n".join(json.dumps({"text": t}) for t in docs(20, 3)) + "\n")
  a_file = tmp_path / "notes.txt"
  a_file.write_text("keep me")
  run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
  (run_a / "checkpoints" / "2").mkdir(parents=True)
  (run_a / "config.json").write_text("{}")
  run_b.mkdir()
  (run_b / "metrics.jsonl").write_text("{}\n")
  for out, why in [(a_file, "exists and is not a folder"), (run_a, "training run's folder"),
                   (run_b, "training run's folder")]:
    before = _tree(out) if out.is_dir() else out.read_bytes()
    prepare_cli.FLAGS(["prepare", f"--input={src}", f"--output={out}", "--seq_len=8",
                       f"--tokenizer_path={GPT2_DIR}", "--workers=1"])
    try:
      with pytest.raises(SystemExit) as e:
        prepare_cli.main([])
    finally:
      prepare_cli.FLAGS.unparse_flags()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"--output={str(out)!r}" in err and why in err, err
    assert (_tree(out) if out.is_dir() else out.read_bytes()) == before
  out = tmp_path / "prepared"
  rows = run(src, out, seq_len=8)["rows"]
  (out / "manifest.json").unlink()  # an unfinished folder: the rerun finishes it
  assert run(src, out, seq_len=8)["rows"] == rows


def test_cli_prepare_without_flags_exits_2():
  proc = subprocess.run([sys.executable, "-m", "nextlat_jax.cli", "prepare"], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and "prepare needs --input and --output" in proc.stderr, proc.stderr
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
