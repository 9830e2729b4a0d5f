"""The dataset of the local lm-eval tasks in this folder: a jsonl of {"text": ...} documents as the split
"test" of a `datasets.DatasetDict` (lm-eval's `custom_dataset` hook: nothing is downloaded)."""
from __future__ import annotations

import json
import os
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def load(data_file: str = "local_text.jsonl", **kwargs: Any) -> Any:
  """DatasetDict {"test": the documents of `data_file` (relative to this folder, or absolute)}."""
  del kwargs  # lm-eval also passes the task's metadata (version, ...)
  import datasets
  path = data_file if os.path.isabs(data_file) else os.path.join(HERE, data_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"'{path}': the local task's documents are missing")
  with open(path, encoding="utf-8") as f:
    docs = [json.loads(line) for line in f if line.strip()]
  return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": str(d["text"])} for d in docs])})
