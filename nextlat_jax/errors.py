"""User errors: ConfigError, `need` (the check every config validator raises it with) and `fail` (a
command's one-line exit). A leaf module: it imports nothing of the package, so validators beside what they
validate and command modules can import it without import cycles."""
from __future__ import annotations

import os
import sys


class ConfigError(ValueError):
  """A bad config value; the message is one line naming the key and the value."""

  def __init__(self, key: str, value: object, why: str):
    super().__init__(f"config error: {key}={value!r}: {why}")
    self.key, self.value, self.why = key, value, why


def need(ok: bool, key: str, value: object, why: str) -> None:
  """Raises ConfigError(key, value, why) unless ok."""
  if not ok:
    raise ConfigError(key, value, why)


def fail(message: str) -> None:
  """A user error: `message` as the one line on stderr, exit status 2."""
  print(message, file=sys.stderr)
  sys.exit(2)


def need_output_folder(key: str, path: str) -> None:
  """Raises ConfigError unless `path` can be a command's output folder: not a file, and not a training
  run's folder (one holding checkpoints/ or metrics.jsonl), whose files the output would overwrite."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(key, path, "exists and is not a folder; choose a new folder")
  if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.exists(os.path.join(path, "metrics.jsonl")):
    raise ConfigError(key, path, "is a training run's folder (has checkpoints/ or metrics.jsonl); choose a new folder")

