"""Model FLOPs utilisation: model FLOPs per step (nextlat_jax.flops) / (step time x devices x peak).

Peaks are dense bfloat16 matmul FLOP/s per device from the vendors' data sheets (no sparsity).
Override with `config.peak_flops_per_device` (e.g. for float32 compute or an unlisted chip).
"""
from __future__ import annotations

from typing import Any

import jax

from nextlat_jax import flops

# (substring of jax's device_kind, lower-case) -> dense bf16 FLOP/s per device
PEAK_BF16 = (
    ("h200", 989e12), ("h100", 989e12), ("h800", 989e12), ("gh200", 989e12),
    ("b200", 2250e12), ("b100", 1750e12), ("a100", 312e12), ("a800", 312e12),
    ("l40s", 362e12), ("a6000", 155e12), ("a5000", 111e12),
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12), ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12),
)


def peak_flops_per_device(config: Any, device: Any | None = None) -> float | None:
  """The configured peak, else the table's entry for this device kind, else None (e.g. CPUs)."""
  override = float(config.peak_flops_per_device)
  if override > 0:
    return override
  kind = (device or jax.devices()[0]).device_kind.lower()
  for key, peak in PEAK_BF16:
    if key in kind:
      return peak
  return None


def step_flops(config: Any, row_len: int) -> float:
  """Model FLOPs of one train step of the global batch (6N + attention, objective extras included)."""
  return float(flops.train_flops_per_step(config, row_len, int(config.batch_size))["total"])
