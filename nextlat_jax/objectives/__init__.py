"""Training objectives, selected by `config.objective.name`.

An objective is a bundle of pure functions (see `Objective`); the trainer, metrics and decoding know
objectives only through it.

Loss normalisation: every loss term and metric is a sum over rows divided by a denominator that
depends on the batch only (a mask count: loss tokens, valid pairs, rows), named in `counts(batch)`.
`loss(params, batch, rng, counts)` divides by the given counts (by default the batch's own), so for any
split of a batch's rows, the parts' losses, metrics and gradients under the whole batch's counts sum to
the whole batch's: token-weighted gradient accumulation (train/step.py).
"""
from __future__ import annotations

import importlib
from typing import Any

from nextlat_jax.errors import need
from nextlat_jax.objectives.base import Batch, Counts, Objective, Params

__all__ = ["Batch", "Counts", "Objective", "Params", "build", "names", "validate", "validate_sharding"]
# objective.name -> its module: `build(config, mesh) -> Objective`; optionally `validate(config)` (its
# objective.* keys; raises ConfigError) and `validate_sharding(config, fsdp, tensor)` (its widths on the mesh).
MODULES = {name: f"nextlat_jax.objectives.{name}" for name in ("gpt", "nextlat", "mtp", "mtp_deepseek", "jtp", "bst")}


def names() -> tuple[str, ...]:
  """The objective names, in the registry's order."""
  return tuple(MODULES)


def _module(name: str) -> Any:
  return importlib.import_module(MODULES[name])


def build(config: Any, mesh: Any = None) -> Objective:
  """The objective named by config.objective.name, with its modules bound to `mesh`."""
  name = config.objective.name
  if name not in MODULES:
    raise ValueError(f"objective.name={name!r}: unknown objective (known: {', '.join(names())})")
  return _module(name).build(config, mesh)


def validate(config: Any) -> None:
  """objective.name and the named objective's own keys; raises ConfigError for the first bad value."""
  o = config.objective
  need(o.name in MODULES, "objective.name", o.name, f"unknown objective (known: {', '.join(names())})")
  need(isinstance(o.vocab_chunk, int) and o.vocab_chunk >= 0, "objective.vocab_chunk", o.vocab_chunk,
       "must be an integer >= 0 (positions per chunk; 0: unchunked)")
  check = getattr(_module(o.name), "validate", None)
  if check is not None:
    check(config)


def validate_sharding(config: Any, fsdp: int, tensor: int) -> None:
  """The named objective's own widths against the mesh's fsdp / tensor sizes (after the trunk's)."""
  check = getattr(_module(config.objective.name), "validate_sharding", None)
  if check is not None:
    check(config, fsdp, tensor)
