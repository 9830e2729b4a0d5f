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


class MetricsWriter:
  def __init__(self, workdir: str, *, enabled: bool, total_steps: int, initial_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    from tensorboardX import SummaryWriter  # needs no TensorFlow
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
    self._postfix: dict[str, str] = {}

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    for key, label, fmt in PROGRESS_KEYS:
      if key in scalars:
        self._postfix[label] = fmt.format(scalars[key])
    self._bar.set_postfix(self._postfix, refresh=False)

  def write_static(self, step: int, **info: Any) -> None:
    """Non-scalar run facts (memory, parameter counts) as one JSON line."""
    if self.enabled:
      self._jsonl.write(json.dumps({"step": int(step), "info": info}) + "\n")

  def advance(self, step: int) -> None:
    if self.enabled:
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      self._tb.close()
      self._jsonl.close()
