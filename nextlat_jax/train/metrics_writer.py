"""Where metrics go: DIR/metrics.jsonl (one object per logged step), TensorBoard events, a progress bar.

Only the main process writes; the others get a disabled writer.
"""
from __future__ import annotations

import json
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


class MetricsWriter:
  def __init__(self, workdir: str, *, enabled: bool, total_steps: int, initial_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
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
    """Non-scalar run facts (memory, parameter counts) as one JSON line."""
    if self.enabled:
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
