"""optimizer.name = "muon": Muon on the hidden matrices, AdamW on the rest (nextlat_jax/train/optimizer.py).

- The Muon chain equals a direct numpy implementation (optax's bias-corrected momentum, Nesterov or not,
  Newton-Schulz quintic with optax's coefficients, shape scaling, decoupled weight decay) and optax's own
  `optax.contrib.muon`.
- The optimizer that step.build makes for a small NextLat model, fed the model's gradients: one matrix of
  each Muon kind (a layer of the stacked `mlp_out`, the k block of the stacked fused `qkv`) gets the
  direct Muon update, and the AdamW-routed params (embed, head, norms, p_psi's first/last layers) get
  exactly optax.adamw's updates.
- On a (data=2, fsdp=2, tensor=2) mesh of the 8 fake CPU devices the train step gives the same losses and
  the sharded optimizer the same updates for the same gradients.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nextlat_jax.config import ConfigError, validate
from nextlat_jax.parallel import sharding
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import optimizer as opt_lib
from nextlat_jax.train import step as step_lib

from tests.tiny import contract_fields, random_rows, tiny_config

EOS, V, D, B, L = 1, 16, 32, 8, 17
A, Bc, C = opt_lib.NS_COEFFS


def newton_schulz(m: np.ndarray, steps: int = 5, eps: float = 1e-8) -> np.ndarray:
  """Quintic Newton-Schulz on an (in, out) matrix, as optax: the wide orientation, Frobenius scaling."""
  x = np.asarray(m, np.float64)
  transposed = x.shape[0] > x.shape[1]
  x = x.T if transposed else x
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    a = x @ x.T
    x = A * x + (Bc * a + C * a @ a) @ x
  return x.T if transposed else x


class DirectMuon:
  """Direct Muon on one (in, out) matrix: optax's momentum form mu = beta mu + (1 - beta) g with bias
  correction; Nesterov mu_hat = beta mu / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t)."""

  def __init__(self, shape, lr, beta=0.95, nesterov=True, wd=0.0, rms=None, steps=5):
    self.mu, self.t = np.zeros(shape), 0
    self.lr, self.beta, self.nesterov, self.wd, self.rms, self.steps = lr, beta, nesterov, wd, rms, steps

  def update(self, g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The additive update of w."""
    b = self.beta
    self.t += 1
    self.mu = b * self.mu + (1 - b) * np.asarray(g, np.float64)
    if self.nesterov:
      mu_hat = b * self.mu / (1 - b ** (self.t + 1)) + (1 - b) * g / (1 - b ** self.t)
    else:
      mu_hat = self.mu / (1 - b ** self.t)
    fan_in, fan_out = g.shape
    o = newton_schulz(mu_hat, self.steps)
    scale = math.sqrt(max(1.0, fan_out / fan_in)) if self.rms is None else self.rms * math.sqrt(max(fan_in, fan_out))
    return -self.lr * (scale * o + self.wd * np.asarray(w, np.float64))


@pytest.mark.parametrize("nesterov,rms", [(True, None), (False, 0.2)])
def test_muon_chain_equals_direct_and_optax_contrib(nesterov, rms):
  rng = np.random.default_rng(0)
  dn = optax.contrib.MuonDimensionNumbers
  params = {"w": jnp.asarray(rng.normal(size=(6, 10)), jnp.float32),  # wide
            "t": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32),  # tall
            "stack": jnp.asarray(rng.normal(size=(3, 8, 2, 5)), jnp.float32)}  # 3 matrices (8, 10)
  dims = {"w": dn(0, 1), "t": dn(0, 1), "stack": dn(1, (2, 3))}
  lr, wd = 0.05, 0.1
  tx = opt_lib.muon(lr, dims, beta=0.9, nesterov=nesterov, weight_decay=wd, consistent_rms=rms)
  ref = optax.contrib.muon(lr, beta=0.9, nesterov=nesterov, weight_decay=wd, consistent_rms=rms,
                           muon_weight_dimension_numbers=dims)
  direct = {"w": DirectMuon((6, 10), lr, 0.9, nesterov, wd, rms), "t": DirectMuon((12, 5), lr, 0.9, nesterov, wd, rms),
            "stack": [DirectMuon((8, 10), lr, 0.9, nesterov, wd, rms) for _ in range(3)]}
  state, ref_state, p, p_ref = tx.init(params), ref.init(params), params, params
  for _ in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    up, state = jax.jit(tx.update)(grads, state, p)
    up_ref, ref_state = jax.jit(ref.update)(grads, ref_state, p_ref)
    for k in params:
      np.testing.assert_allclose(np.asarray(up[k]), np.asarray(up_ref[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for k in ("w", "t"):
      want = direct[k].update(np.asarray(grads[k]), np.asarray(p[k]))
      np.testing.assert_allclose(np.asarray(up[k]), want, rtol=2e-4, atol=1e-6, err_msg=k)
    for i in range(3):
      g, w = (np.asarray(x[i]).reshape(8, 10) for x in (grads["stack"], p["stack"]))
      want = direct["stack"][i].update(g, w)
      np.testing.assert_allclose(np.asarray(up["stack"][i]).reshape(8, 10), want, rtol=2e-4, atol=1e-6)
    p, p_ref = optax.apply_updates(p, up), optax.apply_updates(p_ref, up_ref)


def make_config(shape=(1, 1, 1), **opt):
  c = tiny_config(shape, vocab=V, d_model=D, batch=B, eos=EOS)
  c.objective.horizon = 1
  c.optimizer.update(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1, grad_clip=0.0, **opt)
  return c


def local_batch(seed):
  """Packed rows with EOS crossings and tail padding (as tests/test_sharding.py)."""
  rng = np.random.default_rng(seed)
  tokens = random_rows(rng, B, L, V, EOS, 0.15)
  valid = np.ones((B, L), bool)
  for b, n_pad in enumerate(rng.integers(0, 4, size=B)):
    valid[b, L - n_pad:] = False
  return contract_fields(tokens, valid, EOS)


def test_routing_and_matrix_axes():
  c = make_config()
  setup_boxed = lambda cfg: jax.eval_shape(step_lib.objectives.build(cfg, None).init, jax.random.PRNGKey(0))
  routes = opt_lib.describe_routing(setup_boxed(c), c.optimizer)
  assert routes == {
      "dynamics/fc1/kernel": "adamw", "dynamics/fc2/kernel": "muon (0,) -> (1,)", "dynamics/fc3/kernel": "adamw",
      "dynamics/norm/scale": "adamw", "trunk/blocks/attn_norm/scale": "adamw", "trunk/blocks/mlp_norm/scale": "adamw",
      "trunk/blocks/mlp_in/kernel": "muon (1,) -> (3,)",  # (layers, embed, gate|up, mlp)
      "trunk/blocks/mlp_out/kernel": "muon (1,) -> (2,)",  # (layers, mlp, embed)
      "trunk/blocks/out/kernel": "muon (1, 2) -> (3,)",  # (layers, heads, kv, embed)
      "trunk/blocks/qkv/kernel": "muon (1,) -> (3, 4)",  # (layers, embed, q|k|v, heads, kv)
      "trunk/embed": "adamw", "trunk/final_norm/scale": "adamw", "trunk/head": "adamw"}
  c.model.scan_layers = False
  c.optimizer.update(muon_split_fused=False, muon_adam_patterns=(r"^dynamics/",))
  routes = opt_lib.describe_routing(setup_boxed(c), c.optimizer)
  assert routes["trunk/block_0/qkv/kernel"] == "muon (0,) -> (1, 2, 3)"  # one fused (D, 3D) matrix
  assert routes["trunk/block_1/out/kernel"] == "muon (0, 1) -> (2,)"
  assert routes["trunk/embed"] == "muon (0,) -> (1,)" and routes["trunk/head"] == "muon (0,) -> (1,)"
  assert routes["dynamics/fc2/kernel"] == "adamw"


def test_validation():
  validate(make_config(), num_devices=1)
  for key, value in (("name", "sgd"), ("muon_momentum", 1.0), ("muon_ns_steps", 0), ("muon_lr", 0.0),
                     ("muon_adam_patterns", ("(",)), ("muon_consistent_rms", -1.0)):
    c = make_config()
    c.optimizer[key] = value
    with pytest.raises(ConfigError, match=f"optimizer.{key}"):
      validate(c, num_devices=1)


@functools.cache
def run(shape, steps=3):
  c = make_config(shape)
  n = math.prod(shape)
  validate(c, num_devices=n)
  setup = step_lib.build(c, make_mesh(c.mesh, devices=jax.devices()[:n]))
  state = setup.init(jax.random.PRNGKey(0))
  states, losses = [jax.device_get(state.params)], []
  for k in range(steps):
    state, metrics = setup.step(state, step_lib.global_batch(local_batch(k), setup.batch_sharding),
                                jax.random.PRNGKey(1))
    states.append(jax.device_get(state.params))
    losses.append(float(metrics["loss"]))
  return c, setup, state, states, losses


@functools.cache
def model_grads(steps=3):
  """The real small NextLat model under the Muon optimizer that step.build makes for it, on one device:
  params p_0..p_steps, the gradients g_k at p_k of batch k (each fed once to the optimizer) and the
  losses, with the train step's rng (so they are the train step's losses)."""
  c = make_config((1, 1, 1))
  setup = step_lib.build(c, make_mesh(c.mesh, devices=jax.devices()[:1]))
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b, r: setup.objective.loss(p, b, r)[0]))
  update = jax.jit(setup.tx.update)
  params = jax.device_get(nn.unbox(jax.jit(setup.objective.init)(jax.random.PRNGKey(0))))
  opt_state, states, grads, losses = setup.tx.init(params), [params], [], []
  for k in range(steps):
    batch = {key: jnp.asarray(v) for key, v in local_batch(k).items()}
    loss, g = jax.device_get(grad_fn(states[-1], batch, jax.random.fold_in(jax.random.PRNGKey(1), k)))
    grads.append(g)
    losses.append(float(loss))
    up, opt_state = update(grads[-1], opt_state, states[-1])
    states.append(jax.device_get(optax.apply_updates(states[-1], up)))
  return c, states, grads, losses


def test_model_updates_match_direct_muon_and_adamw():
  """The optimizer step.build makes, on the model's own gradients: one matrix of each Muon kind gets the
  direct Muon update and the AdamW-routed leaves get optax.adamw's. Both sides take the same gradients
  (not a second gradient computation: Adam's g / sqrt(v) would turn its float32 reduction-order noise
  in near-zero entries into whole-step differences)."""
  steps, lr, muon_lr, wd = 3, 1e-3, 0.02, 0.1
  c, states, all_grads, _ = model_grads(steps)
  boxed = jax.eval_shape(step_lib.objectives.build(c, None).init, jax.random.PRNGKey(0))
  adamw = optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd, mask=sharding.decay_mask(boxed))
  adam_state = adamw.init(states[0])
  F = 64  # ffn_width
  mlp_out = [DirectMuon((F, D), muon_lr, wd=wd) for _ in range(2)]  # per layer
  k_proj = DirectMuon((D, D), muon_lr, wd=wd)  # layer 1, the k block of qkv: (D, heads * head_dim)
  adam_paths = [p for p, r in opt_lib.describe_routing(boxed, c.optimizer).items() if r == "adamw"]
  assert len(adam_paths) == 8
  for k in range(steps):
    p0, p1, grads = states[k], states[k + 1], all_grads[k]
    blocks0, blocks1, gblocks = p0["trunk"]["blocks"], p1["trunk"]["blocks"], grads["trunk"]["blocks"]
    for layer in range(2):
      want = mlp_out[layer].update(gblocks["mlp_out"]["kernel"][layer], blocks0["mlp_out"]["kernel"][layer])
      got = blocks1["mlp_out"]["kernel"][layer] - blocks0["mlp_out"]["kernel"][layer]
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-6, err_msg=f"mlp_out layer {layer} step {k}")
    sl = lambda x: np.asarray(x[1, :, 1]).reshape(D, D)  # layer 1, k of (layers, D, q|k|v, heads, hd)
    want = k_proj.update(sl(gblocks["qkv"]["kernel"]), sl(blocks0["qkv"]["kernel"]))
    np.testing.assert_allclose(sl(blocks1["qkv"]["kernel"]) - sl(blocks0["qkv"]["kernel"]), want, rtol=1e-3,
                               atol=2e-6, err_msg=f"qkv k-block step {k}")
    updates, adam_state = adamw.update(grads, adam_state, p0)
    flat = {opt_lib.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(updates)[0]}
    flat0 = {opt_lib.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(p0)[0]}
    flat1 = {opt_lib.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(p1)[0]}
    for path in adam_paths:
      np.testing.assert_allclose(flat1[path], flat0[path] + np.asarray(flat[path]), rtol=1e-6, atol=1e-3 * lr,
                                 err_msg=f"{path} step {k}")


def test_adamw_group_is_exactly_adamw():
  """Same gradients in: the AdamW-routed leaves of the Muon optimizer equal optax.adamw bit for bit."""
  c = make_config()
  init = step_lib.objectives.build(c, None).init
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  params = nn.unbox(jax.jit(init)(jax.random.PRNGKey(0)))
  mask = sharding.decay_mask(boxed)
  tx, _ = opt_lib.make_optimizer(c.optimizer, 10, mask, boxed)
  ref = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask)
  s, r = tx.init(params), ref.init(params)
  rng = np.random.default_rng(0)
  routes = opt_lib.describe_routing(boxed, c.optimizer)
  for _ in range(2):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    up, s = jax.jit(tx.update)(grads, s, params)
    up_ref, r = jax.jit(ref.update)(grads, r, params)
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(up)[0],
                                 jax.tree_util.tree_flatten_with_path(up_ref)[0]):
      if routes[opt_lib.param_path(path)] == "adamw":
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=opt_lib.param_path(path))
      else:
        assert not np.allclose(np.asarray(a), np.asarray(b)), opt_lib.param_path(path)
    params = optax.apply_updates(params, up)


def test_sharded_muon_matches_one_device():
  """On the (2, 2, 2) mesh the train step gives the same losses, and the sharded optimizer the same
  updates for the same gradients (Newton-Schulz on matrices split over fsdp and tensor)."""
  steps = 3
  c, states0, all_grads, losses0 = model_grads(steps)
  _, setup, state, _, losses = run((2, 2, 2), steps)
  np.testing.assert_allclose(losses, losses0, rtol=1e-5)
  assert losses0[-1] < losses0[0]
  one = step_lib.build(c, make_mesh(c.mesh, devices=jax.devices()[:1]))
  param_sh = setup.state_shardings.params
  update8 = jax.jit(setup.tx.update, in_shardings=(param_sh, setup.state_shardings.opt_state, param_sh),
                    out_shardings=(param_sh, setup.state_shardings.opt_state))
  opt8 = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(jax.device_put(states0[0], param_sh))
  opt1, update1 = one.tx.init(states0[0]), jax.jit(one.tx.update)
  for k in range(steps):
    up8, opt8 = update8(jax.device_put(all_grads[k], param_sh), opt8, jax.device_put(states0[k], param_sh))
    up1, opt1 = update1(all_grads[k], opt1, states0[k])
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(up8))[0],
                                 jax.tree_util.tree_flatten_with_path(jax.device_get(up1))[0], strict=True):
      # The same gradients in: elementwise AdamW agrees exactly; Newton-Schulz amplifies its matmuls'
      # reduction-order noise in weak singular directions (up to 1e-5 of the leaf's largest update seen on
      # CPU), while Newton-Schulz on the wrong blocks of a split matrix is off by O(1).
      np.testing.assert_allclose(a, b, rtol=0, atol=2e-4 * float(np.max(np.abs(b))),
                                 err_msg=f"{opt_lib.param_path(path)} step {k}")
  # Muon's momentum shards like its parameter, over fsdp and tensor.
  qkv = state.params["trunk"]["blocks"]["qkv"]["kernel"]
  mu = state.opt_state[-1].inner_states["muon"].inner_state[0].mu["trunk"]["blocks"]["qkv"]["kernel"]
  assert mu.sharding.is_equivalent_to(qkv.sharding, qkv.ndim)
  assert {tuple(s.data.shape) for s in mu.addressable_shards} == {(2, D // 2, 3, 2, 8)}


def test_muon_state_checkpoints(tmp_path):
  """Orbax saves the partitioned (MaskedNode-holding) sharded state and restores it onto the state
  shardings."""
  import orbax.checkpoint as ocp

  from nextlat_jax.train import checkpoint
  _, setup, state, _, _ = run((2, 2, 2))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "rest", checkpoint.rest_of_state(state))
  ckpt.wait_until_finished()
  back = ckpt.restore(tmp_path / "rest", checkpoint.rest_of_state(setup.abstract_state))
  assert jax.tree.structure(back) == jax.tree.structure(checkpoint.rest_of_state(state))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(checkpoint.rest_of_state(state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
