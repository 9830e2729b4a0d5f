"""Where metrics go: DIR/metrics.jsonl (one object per logged step), TensorBoard events, a progress bar.

Only the main process writes; the others get a disabled writer. Each training session (a start or a
resume) first writes a marker row {"step": start, "info": {"session": {"start_step", "time",
"config_hash", ...}}}; `read_history` is the one reader of the file: the rows of a later session replace
those an earlier one logged after the later one's start step (a resumed run has one curve).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import tqdm

PROGRESS_KEYS = (("loss", "loss", "{:.4f}"), ("eval_loss", "eval", "{:.4f}"),
                 ("tokens_per_sec", "tok/s", "{:,.0f}"), ("mfu", "mfu", "{:.1%}"))


def _drop_torn_tail(path: str) -> None:
  """Cuts a trailing partial line (a run killed mid-write) so appended rows start on a fresh line."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    data = f.read()
    if not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def config_hash(config_json: str) -> str:
  """A stable hash of a resolved config JSON: sha256 (first 16 hex digits) of it with sorted keys."""
  canonical = json.dumps(json.loads(config_json), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def read_rows(path: str) -> list[dict]:
  """The JSON objects of a metrics.jsonl in file order (blank or torn lines skipped)."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows.append(row)
  return rows


def read_history(path: str) -> dict[str, list[tuple[int, float]]]:
  """{key: [(step, value)] by increasing step} of the scalars of a metrics.jsonl, latest row wins: a
  session marker at start step s drops what earlier sessions logged after s (their steps were redone),
  and of two rows of one step the later one counts. Non-numeric and non-finite values are left out."""
  latest: dict[str, dict[int, float]] = {}
  for row in read_rows(path):
    step = int(row["step"])
    info = row.get("info")
    session = info.get("session") if isinstance(info, dict) else None
    if session is not None:
      start = int(session.get("start_step", step))
      for by_step in latest.values():
        for s in [s for s in by_step if s > start]:
          del by_step[s]
      continue
    for k, v in row.items():
      if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        continue
      latest.setdefault(k, {})[step] = float(v)
  return {k: sorted(by_step.items()) for k, by_step in latest.items() if by_step}


class MetricsWriter:
  def __init__(self, workdir: str, *, enabled: bool, total_steps: int, initial_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    self._workdir = workdir
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_torn_tail(path)
    # One unbuffered write per line: a reader (or a kill) never sees half a record mid-file.
    self._jsonl = open(path, "ab", buffering=0)
    from tensorboardX import SummaryWriter  # needs no TensorFlow
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
    self._postfix: dict[str, str] = {}

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._line({"step": int(step), **scalars})
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    for key, label, fmt in PROGRESS_KEYS:
      if key in scalars:
        self._postfix[label] = fmt.format(scalars[key])
    self._bar.set_postfix(self._postfix, refresh=False)

  def write_static(self, step: int, **info: Any) -> None:
    """Non-scalar run facts (memory, parameter counts) as one JSON line. `session` (a dict: start_step,
    time, ...) marks a training session's start (read_history); its config_hash is that of DIR/config.json,
    the resolved config the trainer wrote, unless given."""
    if not self.enabled:
      return
    if "session" in info:
      session = {"start_step": int(step), **info["session"]}
      config_path = os.path.join(self._workdir, "config.json")
      if "config_hash" not in session and os.path.exists(config_path):
        with open(config_path) as f:
          session["config_hash"] = config_hash(f.read())
      info = {**info, "session": session}
    self._line({"step": int(step), "info": info})

  def _line(self, row: dict) -> None:
    self._jsonl.write((json.dumps(row) + "\n").encode())

  def advance(self, step: int) -> None:
    if self.enabled:
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      self._tb.close()
      self._jsonl.close()
