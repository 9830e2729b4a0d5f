"""The `Objective` bundle every objective module builds, and the types its functions take (see the
package docstring for the loss-normalisation contract). Objective modules import it from here, so the
package's registry (`nextlat_jax.objectives`) may import them without an import cycle."""
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
  # (params, batch, rng[, counts]) -> (loss, metrics); counts None: the batch's own (package docstring)
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  hidden: Callable[[Params, Batch], jax.Array]  # the state that rank / probe metrics read
  modules: dict[str, Any]  # the Flax modules behind the params tree, by top-level key
  counts: Callable[[Batch], Counts] | None = None  # batch -> the loss's denominators, each a sum over rows
