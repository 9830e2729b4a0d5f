"""Logical axis names -> mesh axes. The rules are data in the config (`config.mesh.rules`)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Parameters: FSDP shards the model width, tensor parallelism shards heads, MLP width and vocabulary.
# Activations: batch over (fsdp, data); heads / MLP width / vocabulary over tensor.
# The batch axis order is fsdp-major on purpose: it matches the device order of the weights' tiling
# (fsdp, tensor, replicated over data). With (data, fsdp) XLA's SPMD partitioner permutes the rows of a
# cotangent into that order before a transposed matmul and never permutes them back: wrong gradients on
# (data, fsdp, tensor) meshes with all three axes > 1 (docs/sharding.md; config.validate refuses that
# order there).
BATCH_AXES = ("fsdp", "data")
DEFAULT_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("dyn_norm", None),
    ("dyn_in", "fsdp"),
    ("dyn_hidden_in", "fsdp"),
    ("dyn_hidden", "tensor"),
    ("dyn_out", "tensor"),  # width-D outputs of the gru gates and attn input/output projections
)


def logical_rules(config: Any) -> tuple:
  """config.mesh.rules as a hashable tuple of (logical name, mesh axes) pairs."""
  rules = config.mesh.get("rules", DEFAULT_RULES)
  return tuple((str(k), tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in rules)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh, rules: tuple) -> Any:
  """NamedShardings for a params tree boxed with logical names (from `jax.eval_shape(init)`)."""
  specs = nn.get_partition_spec(abstract_boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: tuple) -> NamedSharding:
  """Rows over the batch axes, positions replicated."""
  spec = nn.logical_to_mesh_axes(("activation_batch", None), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def decay_mask(abstract_boxed_params: Any) -> Any:
  """True where weight decay applies: parameters of rank >= 2, not counting the scanned layer axis."""
  def is_matrix(p: Any) -> bool:
    names = getattr(p, "names", None)
    if names is None:
      return p.ndim >= 2
    return sum(n != "layers" for n in names) >= 2
  return jax.tree.map(is_matrix, abstract_boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
