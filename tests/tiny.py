"""The tiny model config and hand-built packed rows of the tests that compare sharded runs with one
device and losses with references."""
import ml_collections
import numpy as np

from nextlat_jax.config import base_config
from nextlat_jax.parallel.canary import contract_fields  # noqa: F401  (the tests' packed rows)


def tiny_config(shape=(1, 1, 1), *, vocab: int, d_model: int, batch: int, eos: int, dynamics_hidden: int = 48,
                init_std: float = 0.02) -> ml_collections.ConfigDict:
  """A 2-layer, 4-head NextLat model (SwiGLU width 64, lambda 1/1) on the mesh `shape` = (data, fsdp,
  tensor), 10 steps of `batch` rows; callers set the objective, optimizer and dynamics details."""
  c = base_config()
  c.model.update(vocab_size=vocab, d_model=d_model, n_layer=2, n_head=4, ffn_width=64, init_std=init_std)
  c.dynamics.hidden = dynamics_hidden
  c.objective.update(name="nextlat", lambda_next_h=1.0, lambda_kl=1.0)
  c.data = ml_collections.ConfigDict({"eos_id": eos})
  c.batch_size, c.steps = batch, 10
  c.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
  return c


def random_rows(rng: np.random.Generator, B: int, L: int, V: int, eos: int, eos_rate: float) -> np.ndarray:
  """Tokens in [2, V) with EOS at rate `eos_rate`."""
  tokens = rng.integers(2, V, size=(B, L))
  tokens[rng.random((B, L)) < eos_rate] = eos
  return tokens


def assert_trees_equal(a, b) -> None:
  """Same tree paths, and every leaf of the same dtype and bit-equal."""
  import jax
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and np.array_equal(x, y), p
