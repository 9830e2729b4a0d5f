"""The start-up sharding canary (`train.sharding_canary`; docs/sharding.md).

XLA's SPMD partitioner has miscompiled gradients on layouts that `config.validate` accepts (a
collective-permute of the batch rows that is never undone; docs/sharding.md). Before step 0 on a
multi-device mesh, `check` builds a tiny model of the run's objective, dynamics kind, rules and mesh,
feeds it the run's rows per batch shard and row length, and compares its sharded gradient with the
same gradient on one device. A mismatch raises `CanaryMismatch`, a `ConfigError` (the CLI prints one
line and exits 2).

The tiny model computes in float32 (so float32 reduction-order noise, ~1e-6 of max|g|, is the only
legitimate difference) with XLA's attention; the partitioner's choices depend on sizes, so the canary is
a tripwire for the layout, not a proof for the full-size model.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from nextlat_jax import objectives
from nextlat_jax.config import ConfigError, validate
from nextlat_jax.data import packing
from nextlat_jax.parallel import sharding
from nextlat_jax.parallel.mesh import MESH_AXES

log = logging.getLogger(__name__)
TOLERANCE = 1e-4  # max |g_sharded - g_1dev| / max |g_1dev| per tensor; the bug gives 1e-3 .. 1
EOS = 1


class CanaryMismatch(ConfigError):
  """The sharded gradient of the canary model differs from the single-device one."""

  def __init__(self, layout: dict, error: float, leaf: str, tolerance: float = TOLERANCE):
    super().__init__("mesh", layout, f"sharding canary: sharded gradients differ from one device "
                     f"(max rel. error {error:.3g} > {tolerance:g} at {leaf}; XLA SPMD miscompile, "
                     "docs/sharding.md); choose another mesh / batch_size or set train.sharding_canary=False")
    self.error, self.leaf = error, leaf


def rows_per_shard(config: Any, mesh: Mesh) -> int:
  """Rows each batch shard holds in one microbatch: batch_size // (microbatches * data * fsdp)."""
  dp = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  return int(config.batch_size) // (int(config.microbatches) * dp)


def layout(config: Any, mesh: Mesh, row_len: int) -> dict:
  """The run's layout as the canary's error message names it."""
  return dict({a: int(mesh.shape[a]) for a in MESH_AXES}, rows_per_shard=rows_per_shard(config, mesh),
              row_len=int(row_len))


def tiny_config(config: Any, mesh: Mesh) -> ml_collections.ConfigDict:
  """`config` with a 2-layer float32 model just big enough to shard over `mesh` (objective, dynamics kind
  and options, rules, scan and remat kept); batch_size = one microbatch of the run."""
  c = config.copy_and_resolve_references()
  fsdp, tensor = int(mesh.shape["fsdp"]), int(mesh.shape["tensor"])
  n_head = 2 * tensor
  head_dim = next(h for h in range(8, 8 * fsdp + 9, 2) if (n_head * h) % fsdp == 0)
  d_model = n_head * head_dim
  hidden = math.lcm(fsdp, tensor) * max(1, -(-48 // math.lcm(fsdp, tensor)))
  c.model.update(vocab_size=16 * tensor, d_model=d_model, n_layer=2, n_head=n_head, ffn_width=32 * tensor,
                 dtype="float32", param_dtype="float32", attention_impl=None)
  c.dynamics.hidden = hidden
  c.data = ml_collections.ConfigDict({"eos_id": EOS})
  c.batch_size = rows_per_shard(config, mesh) * int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  c.microbatches = 1
  return c


def canary_batch(rows: int, row_len: int, vocab: int, seed: int = 0) -> dict:
  """Packed rows (batch contract) with EOS crossings, a 2-token prompt after each EOS and tail padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, vocab, size=(rows, row_len))
  tokens[rng.random((rows, row_len)) < 0.15] = EOS
  t = np.arange(row_len)
  valid = t[None, :] < row_len - rng.integers(0, 4, size=(rows, 1))
  return contract_fields(tokens, valid, EOS)


def contract_fields(tokens_BxL: np.ndarray, valid_BxL: np.ndarray, eos: int, pad: int = 0) -> dict:
  """The batch contract (METHOD §2) for rows with EOS crossings: padding (valid False) becomes `pad`
  with segment id -1; each document's tokens at positions 1..2 are prompt (context_length 1 style)."""
  return packing.pack_row_fields(np.where(valid_BxL, tokens_BxL, pad), eos, context_length=1, valid=valid_BxL)


def gradients(config: Any, mesh: Mesh, batch: dict, param_sharding_fn: Any = None, params: Any = None
              ) -> tuple[Any, Any]:
  """jit(grad(loss)) of `config`'s objective on `mesh` with the run's param and batch shardings, for
  `batch` (host arrays), at `params` (host arrays; default `host_params`): (gradients, params), both on
  the host. `param_sharding_fn` (tests) may alter the param shardings."""
  rules = sharding.logical_rules(config)
  objective = objectives.build(config, mesh)
  boxed = jax.eval_shape(objective.init, jax.random.PRNGKey(0))
  param_sh = sharding.param_shardings(boxed, mesh, rules)
  if param_sharding_fn is not None:
    param_sh = param_sharding_fn(param_sh)
  batch_sh = sharding.batch_sharding(mesh, rules)
  rep = sharding.replicated(mesh)
  params = host_params(boxed, float(config.model.init_std)) if params is None else params
  placed_params = jax.tree.map(lambda v, s: jax.make_array_from_callback(v.shape, s, lambda i, v=v: v[i]),
                               params, param_sh)
  grad_fn = jax.jit(jax.grad(lambda p, b, r: objective.loss(p, b, r)[0]),
                    in_shardings=(param_sh, {k: batch_sh for k in batch}, rep), out_shardings=rep)
  placed = {k: jax.make_array_from_callback(v.shape, batch_sh, lambda i, v=v: v[i]) for k, v in batch.items()}
  grads = grad_fn(placed_params, placed, jax.device_put(jax.random.PRNGKey(1), rep))
  return jax.device_get(grads), params


def host_params(abstract_boxed: Any, std: float, seed: int = 0) -> Any:
  """Parameters drawn on the host for the abstract tree (no compiled init: a compile less per mesh):
  norm scales 1, every other leaf N(0, std). Random, not the model's init, which the canary needs no more
  than a nonzero gradient everywhere."""
  rng = np.random.default_rng(seed)
  def draw(path, a):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return np.ones(a.shape, a.dtype)
    return (std * rng.standard_normal(a.shape)).astype(a.dtype)
  return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_boxed))


def relative_errors(grads: Any, reference: Any) -> dict[str, float]:
  """max |g - g_ref| / max |g_ref| for every tensor (path -> error; 0/0 counts as 0)."""
  errors = {}
  for (path, a), (_, r) in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree_util.tree_leaves_with_path(reference), strict=True):
    scale, diff = float(np.max(np.abs(r))), float(np.max(np.abs(np.asarray(a) - np.asarray(r))))
    errors[jax.tree_util.keystr(path)] = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
  return errors


def single_device_mesh() -> Mesh:
  return Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1, 1), MESH_AXES)


def gradient_errors(config: Any, mesh: Mesh, batch: dict, param_sharding_fn: Any = None) -> dict[str, float]:
  """relative_errors of `config`'s gradients on `mesh` against one device, for `batch` (host arrays)."""
  reference, params = gradients(config, single_device_mesh(), batch)
  return relative_errors(gradients(config, mesh, batch, param_sharding_fn, params)[0], reference)


def check(config: Any, mesh: Mesh, row_len: int, tolerance: float = TOLERANCE) -> float:
  """The canary for `config` on `mesh` with rows of `row_len` tokens: the worst relative gradient error;
  raises CanaryMismatch above `tolerance`. Returns 0.0 without computing on a 1-device mesh."""
  if mesh.size == 1:
    return 0.0
  c = tiny_config(config, mesh)
  validate(c, mesh.size)
  errors = gradient_errors(c, mesh, canary_batch(int(c.batch_size), int(row_len), int(c.model.vocab_size)))
  leaf = max(errors, key=errors.get)
  if not errors[leaf] <= tolerance:
    raise CanaryMismatch(layout(config, mesh, row_len), errors[leaf], leaf, tolerance)
  return errors[leaf]


def startup_check(config: Any, mesh: Mesh, row_len: int) -> float | None:
  """The trainer's check before step 0 (train.sharding_canary, multi-device meshes): `check` with its
  error and cost logged; None where it is off."""
  if not config.train.sharding_canary or mesh.devices.size == 1:
    return None
  t0 = time.perf_counter()
  error = check(config, mesh, row_len)
  log.info("sharding canary on mesh %s: max gradient error %.2e relative to max|g| (%.1f s)",
           dict(mesh.shape), error, time.perf_counter() - t0)
  return error
