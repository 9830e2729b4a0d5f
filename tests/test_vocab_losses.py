"""The fused vocabulary losses (objectives/vocab_losses.py: chunks, gradients in the forward pass) equal
the unfused formulas, and keep no float32 (B, T, V) array for the backward pass.

Tolerances: at V = 4096 each float32 result is ~7e-7 (of its tensor's max) from a float64 reference, for
the unfused formulas as for the fused ones (a contraction over V terms carries ~sqrt(V) eps_f32 ~ 4e-6
of rounding at worst), so two float32 computations differ by up to ~2e-6: TOL = 4e-6. A scalar gate's
gradient (JTP's gamma: one sum over every position, 20x smaller than the other gradients) is held to
TOL of the largest gradient in the tree instead of its own magnitude.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextlat_jax import objectives
from nextlat_jax.objectives.losses import forward_kl, token_cross_entropy
from nextlat_jax.objectives.vocab_losses import head_losses
from nextlat_jax.parallel import canary
from nextlat_jax.train.sizes import step_memory

from tests.tiny import contract_fields, random_rows, tiny_config

V, EOS, PAD = 4096, 1, 0
TOL = 4e-6


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("token_loss,train_student_head", [("kl", False), ("kl", True), ("ce", False)])
def test_head_losses_equal_the_naive_formulas(token_loss, train_student_head):
  """CE plus K = 2 students' terms under different cotangents, against losses.py's formulas."""
  B, P, D, K = 2, 37, 16, 2  # P is not a multiple of the chunk: the last chunk is padded
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  h, s = jax.random.normal(k[0], (B, P, D)), jax.random.normal(k[1], (K, B, P, D))
  head = 0.5 * jax.random.normal(k[2], (D, V))
  targets = jax.random.randint(k[3], (B, P), 0, V)
  mask, s_mask = jax.random.uniform(k[4], (B, P)) < 0.7, jax.random.uniform(k[5], (K, B, P)) < 0.6
  weights = jnp.array([0.5, -2.0])  # each student term gets its own cotangent

  def naive(h, s, head):
    z = jnp.einsum("bpd,dv->bpv", h, head)
    s_head = head if train_student_head else jax.lax.stop_gradient(head)
    total = 1.3 * jnp.sum(token_cross_entropy(z, targets) * mask)
    for i in range(K):
      zs = jnp.einsum("bpd,dv->bpv", s[i], s_head)
      per = forward_kl(jax.lax.stop_gradient(z), zs) if token_loss == "kl" else token_cross_entropy(zs, targets)
      total = total + weights[i] * jnp.sum(per * s_mask[i])
    return total

  def fused(h, s, head, chunk):
    ce, toks = head_losses(h, head, targets, mask, s, s_mask, token_loss=token_loss,
                           train_student_head=train_student_head, chunk=chunk)
    return 1.3 * ce + jnp.sum(weights * toks)

  want, want_g = jax.value_and_grad(naive, argnums=(0, 1, 2))(h, s, head)
  for chunk in (0, 5, 64):
    f = jax.jit(fused, static_argnums=3)
    assert _rel(f(h, s, head, chunk), want) < TOL, chunk  # the forward alone (evaluation)
    got, got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)), static_argnums=3)(h, s, head, chunk)
    assert _rel(got, want) < TOL, chunk
    for name, g, w in zip(("h", "students", "head"), got_g, want_g):
      assert _rel(g, w) < TOL, (chunk, name, _rel(g, w))


def _batch(B: int, L: int) -> dict:
  rng = np.random.default_rng(0)
  tokens = random_rows(rng, B, L, V, EOS, 0.15)  # EOS crossings; prompt masks at each document start
  valid = np.ones((B, L), bool)
  valid[1, L - 3:] = False
  return contract_fields(tokens, valid, EOS, PAD)


VARIANTS = {"gpt": dict(name="gpt"), "nextlat_d2_kl": dict(name="nextlat", horizon=2),
            "nextlat_d2_head_trained": dict(name="nextlat", horizon=2, kl_frozen_head=False),
            "nextlat_d1_ce": dict(name="nextlat", horizon=1, token_loss="ce"),
            "mtp": dict(name="mtp", horizon=2), "mtp_deepseek": dict(name="mtp_deepseek", horizon=1),
            "jtp": dict(name="jtp", horizon=1)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_objective_loss_and_gradients_equal_unchunked(variant):
  B, L = 2, 21
  batch, mesh = _batch(B, L), canary.single_device_mesh()
  out = {}
  for chunk in (0, 6):
    c = tiny_config(vocab=V, d_model=16, batch=B, eos=EOS, dynamics_hidden=16)
    c.objective.update(vocab_chunk=chunk, **VARIANTS[variant])
    obj = objectives.build(c, mesh)
    params = canary.host_params(jax.eval_shape(obj.init, jax.random.PRNGKey(0)), 0.02)
    out[chunk] = jax.jit(jax.value_and_grad(lambda p, b: obj.loss(p, b, jax.random.PRNGKey(1))[0]))(params, batch)
  (l0, g0), (l1, g1) = out[0], out[6]
  assert abs(float(l1) - float(l0)) <= TOL * abs(float(l0)), (float(l0), float(l1))
  top = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g0))
  bad = {}
  for (path, a), (_, r) in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves_with_path(g0)):
    scale = float(np.max(np.abs(r))) if r.size > 1 else top
    err = float(np.max(np.abs(np.asarray(a) - np.asarray(r)))) / scale
    if not err < TOL:
      bad[jax.tree_util.keystr(path)] = err
  assert not bad, bad


def test_chunked_rollout_keeps_no_vocabulary_wide_array():
  """NextLat d=4 over GPT (the same trunk, chunked): unchunked, the rollout adds several float32 (B, T, V)
  arrays per step to the gradient's temporaries; chunked, less than one in all."""
  B, L, d = 4, 64, 4
  batch = _batch(B, L)
  full = B * L * V * 4 / 2**20  # MiB of one float32 (B, T, V) array
  temps = {}
  for name, chunk in (("gpt", 8), ("nextlat", 0), ("nextlat", 8)):
    c = tiny_config(vocab=V, d_model=16, batch=B, eos=EOS, dynamics_hidden=16)
    c.objective.update(name=name, horizon=d, vocab_chunk=chunk)
    obj = objectives.build(c, canary.single_device_mesh())
    params = canary.host_params(jax.eval_shape(obj.init, jax.random.PRNGKey(0)), 0.02)
    grad = jax.jit(jax.grad(lambda p, b: obj.loss(p, b, jax.random.PRNGKey(1))[0]))
    temps[name, chunk] = step_memory(grad.lower(params, batch).compile())["temporaries"]
  trunk = temps["gpt", 8]
  assert temps["nextlat", 0] - trunk > d * full, (temps, full)
  assert temps["nextlat", 8] - trunk < full, (temps, full)
