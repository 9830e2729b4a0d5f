"""Logical axis names -> mesh axes. The rules are data in the config (`config.mesh.rules`)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nextlat_jax.errors import ConfigError, need
from nextlat_jax.parallel.mesh import MESH_AXES, mesh_shape

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
  return tuple((str(k), tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.mesh.rules)


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


def validate(config: Any, num_devices: int) -> tuple[int, int, int]:
  """config.mesh over `num_devices` devices, the batch over it (batch_size, microbatches) and the batch
  rule; returns the (data, fsdp, tensor) sizes. Raises ConfigError for the first bad value."""
  c = config
  sizes = {a: c.mesh[a] for a in MESH_AXES}
  try:
    shape = mesh_shape(c.mesh, num_devices)
  except ValueError as e:
    raise ConfigError("mesh", sizes, str(e).split(": ", 1)[-1]) from None
  need(all(s >= 1 for s in shape), "mesh", sizes, "axis sizes must be >= 1 (or one -1)")
  need(shape[0] * shape[1] * shape[2] == num_devices, "mesh", sizes,
       f"product {shape[0] * shape[1] * shape[2]} != device count {num_devices}")
  dp = shape[0] * shape[1]
  need(int(c.batch_size) >= 1 and c.batch_size % dp == 0, "batch_size", c.batch_size,
       f"must be divisible by the data-parallel size mesh.data*mesh.fsdp={dp}")
  k = int(c.microbatches)
  need(k >= 1 and c.batch_size % (k * dp) == 0, "microbatches", k,
       f"batch_size={c.batch_size} must be divisible by microbatches * data-parallel size ({dp})")
  # XLA's SPMD partitioner (jax 0.10.2 .. 0.12.0, Shardy and GSPMD) permutes the batch rows of a cotangent
  # and never permutes them back when the batch is tiled (data, fsdp) and weights (fsdp, tensor) on a mesh
  # with all three axes > 1: wrong gradients (docs/sharding.md). DEFAULT_RULES tile it (fsdp, data).
  batch_rule = dict(logical_rules(c)).get("activation_batch")
  batch_axes = (batch_rule,) if isinstance(batch_rule, str) else tuple(batch_rule or ())
  need(not (min(shape) > 1 and {"data", "fsdp"} <= set(batch_axes)
            and batch_axes.index("data") < batch_axes.index("fsdp")), "mesh.rules", f"activation_batch={batch_rule}",
       f"batch over (data, fsdp) on mesh {dict(zip(MESH_AXES, shape))} triggers an XLA SPMD miscompile "
       "(wrong gradients, docs/sharding.md); use ('fsdp', 'data') as in DEFAULT_RULES")
  return shape
