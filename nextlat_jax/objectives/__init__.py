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

import dataclasses
from typing import Any, Callable

import jax

Params = Any
Batch = dict[str, jax.Array]
Counts = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  init: Callable[[jax.Array], Params]  # rng -> params, boxed with logical axis names
  # (params, batch, rng[, counts]) -> (loss, metrics); counts None: the batch's own (module docstring)
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  hidden: Callable[[Params, Batch], jax.Array]  # the state that rank / probe metrics read
  modules: dict[str, Any]  # the Flax modules behind the params tree, by top-level key
  counts: Callable[[Batch], Counts] | None = None  # batch -> the loss's denominators, each a sum over rows


def names() -> tuple[str, ...]:
  return ("gpt", "nextlat", "mtp", "mtp_deepseek", "jtp", "bst")


def build(config: Any, mesh: Any = None) -> Objective:
  """The objective named by config.objective.name, with its modules bound to `mesh`."""
  name = config.objective.name
  if name == "gpt":
    from nextlat_jax.objectives import gpt
    return gpt.build(config, mesh)
  if name == "nextlat":
    from nextlat_jax.objectives import nextlat
    return nextlat.build(config, mesh)
  if name in ("mtp", "mtp_deepseek", "jtp", "bst"):  # the baselines (BASELINES.md), one module each
    import importlib
    return importlib.import_module(f"nextlat_jax.objectives.{name}").build(config, mesh)
  raise ValueError(f"objective.name={name!r}: unknown objective (known: {', '.join(names())})")
