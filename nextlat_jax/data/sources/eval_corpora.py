"""Evaluation corpora readers (TASKS.md §7): FineWeb-Edu validation, WikiText (document level), LAMBADA.

Readers only: they yield documents or (context, target) pairs; the metrics live with the tasks.

- FineWeb-Edu validation: the documents of a held-out shard (any parquet / jsonl / text file).
- WikiText-2/103 raw, document level, as lm-eval's `wikitext` task reads it: the pages of
  `EleutherAI/wikitext_document_level` (parquet or jsonl with a `page` field: exact), or of a raw
  `wiki.test.raw` file split into articles at each top-level heading line " = Title = " (our
  reconstruction of that dataset's split, not checked against it). lm-eval scores
  `wikitext_detokenizer(page)` by rolling log-likelihood and divides by the words of the ORIGINAL page
  (`wikitext_words`).
- LAMBADA (lm-eval `lambada_standard`): jsonl / parquet with a `text` field; context = the text
  without its last space-separated word, target = " " + that word.
"""
from __future__ import annotations

import re
from typing import Iterator

from nextlat_jax.data.sources import documents

_HEADING = re.compile(r"^ = [^=].* = $")  # a top-level (article) heading line of the raw files


def fineweb_validation(path: str, column: str = "text", max_documents: int | None = None,
                       stats: documents.Stats | None = None) -> Iterator[str]:
  """The non-empty documents of the held-out files `path` (counts go to `stats`)."""
  files = documents.expand(path)
  for i, doc in enumerate(documents.iter_documents(files, stats or documents.Stats(), column)):
    if max_documents is not None and i >= max_documents:
      return
    yield doc


def wikitext_detokenizer(string: str) -> str:
  """lm-eval's `wikitext_detokenizer` (lm_eval/tasks/wikitext/preprocess_wikitext.py), same rules,
  same order."""
  # contractions
  string = string.replace("s '", "s'")
  string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
  # number separators
  string = string.replace(" @-@ ", "-")
  string = string.replace(" @,@ ", ",")
  string = string.replace(" @.@ ", ".")
  # punctuation
  string = string.replace(" : ", ": ")
  string = string.replace(" ; ", "; ")
  string = string.replace(" . ", ". ")
  string = string.replace(" ! ", "! ")
  string = string.replace(" ? ", "? ")
  string = string.replace(" , ", ", ")
  # double brackets
  string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
  string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
  string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
  string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
  string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
  # miscellaneous
  string = string.replace("= = = =", "====")
  string = string.replace("= = =", "===")
  string = string.replace("= =", "==")
  string = string.replace(" " + chr(176) + " ", chr(176))
  string = string.replace(" \n", "\n")
  string = string.replace("\n ", "\n")
  string = string.replace(" N ", " 1 ")
  string = string.replace(" 's", "'s")
  return string


def wikitext_words(page: str) -> int:
  """Words of an original (not detokenized) page, as lm-eval counts them for word perplexity."""
  return len(re.split(r"\s+", page))


def _raw_pages(path: str) -> Iterator[str]:
  with documents.open_file(path) as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    raise ValueError(f"{path}: not valid UTF-8 (WikiText raw files are)") from None
  page: list[str] = []
  for line in text.split("\n"):
    if _HEADING.match(line) and any(p.strip() for p in page):
      yield "\n".join(page)
      page = []
    page.append(line)
  if any(p.strip() for p in page):
    yield "\n".join(page)


def wikitext_pages(path: str) -> Iterator[str]:
  """Original WikiText pages: `page` field of parquet / jsonl files (HF layout) or a raw file."""
  for f in documents.expand(path):
    if documents.file_format(f) == "text":
      yield from _raw_pages(f)
      continue
    stats = documents.Stats()
    for raw in documents.read_raw(f, column="page"):
      page = documents.decode(raw, stats)
      if page is not None:
        yield page


def lambada(path: str, column: str = "text") -> Iterator[tuple[str, str]]:
  """(context, target) pairs of LAMBADA passages: target = " " + last space-separated word."""
  stats = documents.Stats()
  for f in documents.expand(path):
    for n, raw in enumerate(documents.read_raw(f, column), 1):
      text = documents.decode(raw, stats)
      if text is None:
        raise ValueError(f"{f}: passage {n} is empty")
      words = text.split(" ")
      if len(words) < 2:
        raise ValueError(f"{f}: passage {n} has no space-separated last word: {text[:60]!r}")
      yield " ".join(words[:-1]), " " + words[-1]
