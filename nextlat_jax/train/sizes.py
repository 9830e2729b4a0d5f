"""How big a run is: parameter counts and the per-device memory of a compiled step, as XLA reports it."""
from __future__ import annotations

import math
from typing import Any

import jax

MIB, GIB = 2**20, 2**30


def param_count(tree: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def step_memory(compiled: Any, unit: int = MIB, digits: int = 2) -> dict[str, float] | None:
  """Per-device arguments / outputs / temporaries / aliased and total (arguments + outputs + temporaries
  - aliased) of a compiled executable in `unit` bytes; None where the backend reports nothing."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  raw = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
         "temporaries": stats.temp_size_in_bytes, "aliased": stats.alias_size_in_bytes}
  raw["total"] = raw["arguments"] + raw["outputs"] + raw["temporaries"] - raw["aliased"]
  return {k: round(v / unit, digits) for k, v in raw.items()}
