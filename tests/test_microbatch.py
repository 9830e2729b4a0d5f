"""Gradient accumulation over microbatches equals the full-batch gradient (equal loss-token counts)."""
import jax
import jax.numpy as jnp
import numpy as np

from nextlat_jax.train import step as step_lib
from tests.test_checkpoint import _batch, _config, _setup


def test_microbatched_grads_equal_full_batch():
  config = _config()
  config.batch_size = 16
  setup = _setup(config, jax.devices(), data=4, fsdp=1, tensor=2)
  params = setup.init(jax.random.PRNGKey(0)).params
  batch = _batch(config, setup)
  # every row trains on every target, so each microbatch's masked mean has the same weight
  batch["loss_mask"] = jax.device_put(jnp.ones_like(batch["loss_mask"]).at[:, 0].set(0), setup.batch_sharding)
  batch["segment_ids"] = jax.device_put(jnp.zeros_like(batch["segment_ids"]), setup.batch_sharding)
  batch["tokens"] = jax.device_put(jnp.where(batch["tokens"] == 1, 2, batch["tokens"]), setup.batch_sharding)
  rng = jax.random.PRNGKey(0)
  full = jax.jit(lambda p, b: step_lib.loss_and_grads(p, b, rng, setup.objective))(params, batch)
  for k in (2, 4):
    micro = jax.jit(lambda p, b: step_lib.loss_and_grads(p, b, rng, setup.objective, k, setup.batch_sharding))(
        params, batch)
    np.testing.assert_allclose(float(micro[0][0]), float(full[0][0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(micro[1]), jax.tree.leaves(full[1])):
      a, b = np.asarray(a), np.asarray(b)
      assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)  # float32 summation order only
