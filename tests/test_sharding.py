"""Sharded training (data / FSDP / tensor parallel) computes the same thing as one device.

Two optimizer updates through `train.step.build(config, mesh)` on a 1-device mesh, an (8, 1, 1) mesh and a
(2, 2, 2) mesh of the 8 fake CPU devices (conftest) give the same losses and parameters, for the NextLat
(d = 2) and GPT objectives; on (2, 2, 2) the parameters and the batch really are split.
"""

import functools
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nextlat_jax.config import validate
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import step as step_lib

from tests.tiny import contract_fields, random_rows, tiny_config

EOS, PAD, V, D, B, L = 1, 0, 16, 32, 8, 17
MESHES = ((1, 1, 1), (8, 1, 1), (2, 2, 2))  # (data, fsdp, tensor)
STEPS = 2
LR = 1e-3


def make_config(objective, shape):
  c = tiny_config(shape, vocab=V, d_model=D, batch=B, eos=EOS)
  c.objective.update(name=objective, horizon=2)
  c.optimizer.update(lr=LR, weight_decay=0.1, grad_clip=1.0)
  return c


def local_batch(seed):
  """Packed rows (METHOD §2) with EOS crossings, context_length-1 prompt masks and tail padding."""
  rng = np.random.default_rng(seed)
  tokens = random_rows(rng, B, L, V, EOS, 0.15)
  valid = np.ones((B, L), bool)
  for b, n_pad in enumerate(rng.integers(0, 4, size=B)):
    valid[b, L - n_pad:] = False
  return contract_fields(tokens, valid, EOS, PAD)


@functools.lru_cache(maxsize=None)
def train(objective, shape):
  """Two steps on `shape`: (initial params, per-step metrics, final params) on the host, and the sharded
  final state and last global batch for inspection."""
  c = make_config(objective, shape)
  n = math.prod(shape)
  validate(c, num_devices=n)
  mesh = make_mesh(c.mesh, devices=jax.devices()[:n])
  assert dict(mesh.shape) == {'data': shape[0], 'fsdp': shape[1], 'tensor': shape[2]}
  setup = step_lib.build(c, mesh)
  state = setup.init(jax.random.PRNGKey(0))
  init_params = jax.device_get(state.params)
  history, batch = [], None
  for k in range(STEPS):
    batch = step_lib.global_batch(local_batch(k), setup.batch_sharding)
    state, metrics = setup.step(state, batch, jax.random.PRNGKey(1))  # donates the old state
    history.append(jax.device_get(metrics))
  return init_params, history, jax.device_get(state.params), state, batch


def assert_trees_close(a, b, rtol, atol, what):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=f'{what} {jax.tree_util.keystr(path)}')


@pytest.mark.parametrize('objective', ['nextlat', 'gpt'])
def test_same_losses_and_params_on_every_mesh(objective):
  init0, hist0, params0, _, _ = train(objective, MESHES[0])
  keys = ['loss', 'ce', 'grad_norm'] + (['next_h', 'kl', 'next_h_1', 'kl_2'] if objective == 'nextlat' else [])
  # The reference run really trains: the loss moves and every parameter leaf is updated.
  assert float(hist0[1]['loss']) != float(hist0[0]['loss'])
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(init0),
                               jax.tree_util.tree_leaves_with_path(params0)):
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 0.5 * LR, jax.tree_util.keystr(path)
  for shape in MESHES[1:]:
    init, hist, params, _, _ = train(objective, shape)
    assert_trees_close(init, init0, rtol=0, atol=0, what=f'{shape} init')  # init is layout-independent
    for k in range(STEPS):
      for key in keys:
        np.testing.assert_allclose(float(hist[k][key]), float(hist0[k][key]), rtol=1e-5,
                                   err_msg=f'{shape} step {k} {key}')
    # Adam divides by sqrt(v) + eps, so for entries with tiny gradients float32 reduction-order noise
    # (~1e-9) becomes ~1e-3 of a step of size LR (measured up to 2e-3 * LR across XLA optimisation
    # levels). Parameters therefore agree to rtol 1e-5 and atol 1e-5 = 1% of one LR-sized step; the
    # losses and gradient norms above, which Adam does not normalise, are compared at rtol 1e-5.
    assert_trees_close(params, params0, rtol=1e-5, atol=1e-2 * LR, what=f'{shape} params')


def shard_shapes(x):
  return {tuple(s.data.shape) for s in x.addressable_shards}


@pytest.mark.parametrize('objective', ['nextlat', 'gpt'])
def test_params_and_batch_are_sharded(objective):
  _, _, _, state, batch = train(objective, (2, 2, 2))
  trunk = state.params['trunk']
  qkv = trunk['blocks']['qkv']['kernel']  # (layers, D, 3, heads, head_dim)
  assert qkv.shape == (2, D, 3, 4, 8)
  spec = tuple(qkv.sharding.spec)
  assert 'fsdp' in spec and 'tensor' in spec, spec
  assert spec[1] == 'fsdp' and spec[3] == 'tensor'
  assert shard_shapes(qkv) == {(2, D // 2, 3, 2, 8)}
  assert shard_shapes(trunk['embed']) == {(V // 2, D // 2)}  # (vocab, embed) -> (tensor, fsdp)
  assert shard_shapes(trunk['head']) == {(D // 2, V // 2)}
  assert shard_shapes(trunk['blocks']['mlp_in']['kernel']) == {(2, D // 2, 2, 32)}
  if objective == 'nextlat':
    assert shard_shapes(state.params['dynamics']['fc1']['kernel']) == {(2 * D // 2, 24)}
  # Adam moments shard like their parameters.
  mu = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, 'shape', None) == qkv.shape]
  assert len(mu) == 2 and all(x.sharding.is_equivalent_to(qkv.sharding, qkv.ndim) for x in mu)

  # The batch: rows split over data x fsdp (4 groups of 2 rows), replicated over tensor.
  tokens = batch['tokens']
  assert tokens.sharding.spec == P(('data', 'fsdp'), None)
  assert shard_shapes(tokens) == {(B // 4, L)}
  rows = {s.index[0].indices(B) for s in tokens.addressable_shards}
  assert len(rows) == 4
  for key in step_lib.BATCH_KEYS:
    assert batch[key].sharding == tokens.sharding
