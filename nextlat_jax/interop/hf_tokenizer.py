"""A run's tokenizer as Hugging Face tokenizer files (what `export-hf` writes beside the weights).

GPT-2: vocab.json / merges.txt; a BPE `tokenizers` file: tokenizer.json; the street-grid / Manhattan
word vocabulary: a WordLevel tokenizer.json (whitespace-split words). EOS is BOS and EOS.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

from nextlat_jax.data import tokenizers


def tokenizer_files(config: Any, tok: Any) -> dict[str, str]:
  """HF tokenizer files (name -> text) for the run's tokenizer; {} when it has no HF form."""
  seq_len = int(config.data.get("seq_len", 0) or 0) or None
  common = {"model_max_length": seq_len, "clean_up_tokenization_spaces": False}
  if isinstance(tok, tokenizers.GPT2Tokenizer):
    path = config.data.get("tokenizer_path", "") or ""
    try:
      path = path or tokenizers.bundled_gpt2_dir()
    except ValueError:
      return {}
    read = lambda f: pathlib.Path(path, f).read_text(encoding="utf-8")
    eos = tokenizers.GPT2_EOS
    cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos, "unk_token": eos,
           "add_prefix_space": False, **common}
    return {"vocab.json": read("encoder.json"), "merges.txt": read("vocab.bpe"),
            "tokenizer_config.json": json.dumps(cfg, indent=2)}
  if isinstance(tok, tokenizers.BPETokenizer):
    specials = tokenizers.BPE_SPECIALS
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[0],
           "pad_token": specials[1], **common}
    return {"tokenizer.json": tok.tokenizer.to_str(), "tokenizer_config.json": json.dumps(cfg, indent=2)}
  words = getattr(tok, "words", None)
  if words is not None:  # the street-grid / Manhattan word vocabulary: whitespace-split words
    from tokenizers import Tokenizer, models, pre_tokenizers
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[tok.pad_id]))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": words[tok.eos_id],
           "eos_token": words[tok.eos_id], "pad_token": words[tok.pad_id], **common}
    return {"tokenizer.json": t.to_str(), "tokenizer_config.json": json.dumps(cfg, indent=2)}
  return {}
