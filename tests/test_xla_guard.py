"""A known XLA SPMD miscompile and the config guard that keeps users out of it.

On jax 0.10 (CPU), the gradient of a weight sharded (fsdp, tensor) is wrong when data, fsdp and tensor
are all > 1 and each batch shard holds exactly one row. `config.validate` refuses that layout.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nextlat_jax.config import ConfigError, base_config, validate


def _grad_error(shape, rows_per_shard):
  mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp", "tensor"))
  B = shape[0] * shape[1] * rows_per_shard
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(k1, (B, 16, 32))
  w1, w2 = jax.random.normal(k2, (32, 32)) * 0.2, jax.random.normal(k3, (32, 32)) * 0.2

  def loss(w1, w2, x):
    a = jax.nn.gelu(x @ w1)
    a = jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
    return jnp.mean(jax.nn.gelu(a @ w2) ** 2)

  ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(w1, w2, x)
  sh = lambda s: NamedSharding(mesh, s)
  out = jax.jit(jax.grad(loss, argnums=(0, 1)),
                in_shardings=(sh(P("fsdp", "tensor")), sh(P("fsdp", "tensor")), sh(P(("data", "fsdp")))))(w1, w2, x)
  return max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(out, ref))


def test_allowed_layouts_give_exact_gradients():
  for shape, rows in (((2, 2, 2), 2), ((4, 1, 2), 1), ((1, 4, 2), 1), ((4, 2, 1), 1)):
    assert _grad_error(shape, rows) < 1e-5, shape


def test_guard_refuses_the_miscompiled_layout():
  c = base_config()
  c.model.vocab_size = 64
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.batch_size = 4
  with pytest.raises(ConfigError, match="batch_size=4: one row per batch shard"):
    validate(c, 8)
  c.batch_size = 8
  validate(c, 8)


def test_miscompile_still_present():
  """Tells us when an XLA upgrade fixes the bug, so the guard can go (xfail once it is fixed)."""
  err = _grad_error((2, 2, 2), 1)
  if err < 1e-5:
    pytest.xfail("XLA no longer miscompiles this layout; the guard in config.validate can be relaxed")
  assert err > 0.1
