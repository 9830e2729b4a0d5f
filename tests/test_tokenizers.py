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
