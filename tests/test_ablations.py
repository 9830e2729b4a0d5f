"""NextLat ablation switches (docs/research.md): each one changes exactly what it names.

For every switch setting the library's loss and full gradient are compared with jax.grad of an
independent reference in which the stop-gradients sit exactly where the switches say; values of the new
terms (latent CE, MSE, cosine) are also compared with a float64 per-chain loop. Gradient *differences*
between two settings are checked to live only in the parameters the switch is about, and to be large.
Tiny float32 models (init std 0.2, randomised norm scales), d = 2, lambda_next_h = 0.7, lambda_KL = 0.3.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nextlat_jax import objectives
from nextlat_jax.config import ConfigError, base_config, from_saved, validate

from tests.tiny import contract_fields, random_rows

EOS, PAD, V, D, H_PSI, B, L, HORIZON, LAM_H, LAM_KL = 1, 0, 16, 32, 48, 4, 12, 2, 0.7, 0.3
FAST = {"xla_backend_optimization_level": 0}
DEFAULTS = dict(next_h_stop_gradient=True, kl_frozen_head=True, token_loss="kl", next_h_loss="smooth_l1")


def make_config(**switches):
  c = base_config()
  c.model.update(vocab_size=V, d_model=D, n_layer=2, n_head=4, ffn_width=64, init_std=0.2)
  c.dynamics.hidden = H_PSI
  c.objective.update(name="nextlat", horizon=HORIZON, lambda_next_h=LAM_H, lambda_kl=LAM_KL, **switches)
  c.data = ml_collections.ConfigDict({"eos_id": EOS})
  c.batch_size = B
  return c


def make_batch():
  """Packed rows with EOS crossings, context-length-1 prompt masks and tail padding (METHOD §2)."""
  tokens = random_rows(np.random.default_rng(0), B, L, V, EOS, 0.2)
  tokens[0, 4] = EOS
  valid = np.ones((B, L), bool)
  valid[1, L - 3:] = False
  return contract_fields(tokens, valid, EOS, PAD)


BATCH = make_batch()
TRUNK = objectives.build(make_config()).modules["trunk"]


@functools.lru_cache(maxsize=None)
def params():
  p = nn.unbox(jax.jit(objectives.build(make_config()).init)(jax.random.PRNGKey(0)))
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map_with_path(  # non-trivial learnable norm weights
      lambda path, a: a * (1 + 0.3 * rng.standard_normal(a.shape)).astype(a.dtype)
      if getattr(path[-1], "key", None) == "scale" else a, p)


def chain_masks():
  """m_h[i] (B, T-i) and m_kl[i] (B, T-i-1) by explicit loops (METHOD §5.5, eos_mask = transition)."""
  x, lm, valid = BATCH["tokens"], BATCH["loss_mask"], BATCH["segment_ids"] >= 0
  m_h = {i: np.zeros((B, L - i), bool) for i in range(1, HORIZON + 1)}
  m_kl = {i: np.zeros((B, L - i - 1), bool) for i in range(1, HORIZON + 1)}
  for b in range(B):
    for t in range(L):
      for i in range(1, HORIZON + 1):
        s = t + i
        if s < L and x[b, s] != EOS and valid[b, t:s + 1].all():
          m_h[i][b, t] = True
          if s + 1 < L:
            m_kl[i][b, t] = bool(lm[b, s + 1])
  return m_h, m_kl


M_H, M_KL = chain_masks()


# ----------------------------------------------------------------------------------------------------
# Independent reference: stop-gradients placed by hand from the switches

def psi(dp, h, e):
  z = jnp.concatenate([e, h], axis=-1)
  z = z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + 1e-5) * dp["norm"]["scale"]
  a = jax.nn.gelu(z @ dp["fc1"]["kernel"], approximate=False)
  a = jax.nn.gelu(a @ dp["fc2"]["kernel"], approximate=False)
  return h + a @ dp["fc3"]["kernel"]


def ref_loss(p, w):
  """One jitted reference for every setting: w holds runtime 0/1 weights. A stop-gradient that a switch
  may remove is written a * sg(x) + (1 - a) * x (value x, gradient (1 - a) dx: exact for a in {0, 1});
  every variant of a term is computed and the unused ones get weight 0."""
  def blend(a, x):
    return a * jax.lax.stop_gradient(x) + (1 - a) * x

  h, e = TRUNK.apply({"params": p["trunk"]}, BATCH["tokens"], BATCH["segment_ids"], BATCH["positions"])
  head, x = p["trunk"]["head"], jnp.asarray(BATCH["tokens"])
  m_tok = jnp.asarray(BATCH["loss_mask"][:, 1:], jnp.float32)
  logits = h[:, :-1] @ head
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[:, 1:, None], -1)[..., 0]
  ce = jnp.sum(nll * m_tok) / jnp.sum(m_tok)
  target, head_s = blend(w["next_h_stop_gradient"], h), blend(w["kl_frozen_head"], head)
  log_q = jax.nn.log_softmax(jax.lax.stop_gradient(logits), -1)
  cur, nh, tok = h, 0.0, 0.0
  for i in range(1, HORIZON + 1):
    cur = psi(p["dynamics"], cur[:, :-1], e[:, i:])
    mh, mk = jnp.asarray(M_H[i], jnp.float32), jnp.asarray(M_KL[i], jnp.float32)
    u, y = cur - target[:, i:], target[:, i:]
    per = (w["smooth_l1"] * jnp.mean(jnp.where(jnp.abs(u) < 1, 0.5 * u * u, jnp.abs(u) - 0.5), -1)
           + w["mse"] * jnp.mean(u * u, -1)
           + w["cosine"] * (1 - jnp.sum(cur * y, -1) / (jnp.linalg.norm(cur, axis=-1) * jnp.linalg.norm(y, axis=-1))))
    nh += jnp.sum(per * mh) / jnp.sum(mh)
    log_p = jax.nn.log_softmax(cur[:, :-1] @ head_s, -1)
    per_tok = (w["kl"] * jnp.sum(jnp.exp(log_q[:, i:]) * (log_q[:, i:] - log_p), -1)
               - w["ce"] * jnp.take_along_axis(log_p, x[:, i + 1:, None], -1)[..., 0])  # the true x_{t+i+1}
    tok += jnp.sum(per_tok * mk) / jnp.sum(mk)
  return ce + LAM_H * nh / HORIZON + LAM_KL * tok / HORIZON, (ce, nh / HORIZON, tok / HORIZON)


ref_value_and_grad = jax.jit(jax.value_and_grad(ref_loss, has_aux=True), compiler_options=FAST)


def run(**switches):
  """(library metrics, library grads, reference values, reference grads) for one switch setting."""
  return _run(tuple(sorted((k, v) for k, v in switches.items() if DEFAULTS[k] != v)))


@functools.lru_cache(maxsize=None)
def _run(switches):
  sw = dict(DEFAULTS, **dict(switches))
  obj = objectives.build(make_config(**dict(switches)))
  (_, metrics), grads = jax.jit(jax.value_and_grad(obj.loss, has_aux=True), compiler_options=FAST)(
      params(), BATCH, jax.random.PRNGKey(0))
  w = {"next_h_stop_gradient": float(sw["next_h_stop_gradient"]), "kl_frozen_head": float(sw["kl_frozen_head"])}
  w.update({k: float(sw["next_h_loss"] == k) for k in ("smooth_l1", "mse", "cosine")})
  w.update({k: float(sw["token_loss"] == k) for k in ("kl", "ce")})
  (ref, values), ref_grads = ref_value_and_grad(params(), jax.tree.map(jnp.float32, w))
  return jax.device_get(metrics), jax.device_get(grads), (float(ref),) + tuple(map(float, values)), ref_grads


def assert_trees_close(actual, expected, rtol=1e-4, what=""):
  leaves = jax.tree_util.tree_leaves_with_path
  for (path, a), (_, e) in zip(leaves(actual), leaves(expected), strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.max(np.abs(e)) + 1e-30,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


def max_abs(tree):
  return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(tree))


def diff(a, b):
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


# ----------------------------------------------------------------------------------------------------
# Naive float64 per-chain values of the new terms

_erf = np.vectorize(math.erf)


def np_psi(dp, h, e):
  z = np.concatenate([e, h])
  z = z / np.sqrt(np.mean(z * z) + 1e-5) * dp["norm"]["scale"]
  def gelu(a):
    return 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))
  return h + gelu(gelu(z @ dp["fc1"]["kernel"]) @ dp["fc2"]["kernel"]) @ dp["fc3"]["kernel"]


def naive_terms():
  """{"mse" | "cosine" (next-h terms) | "ce" (latent CE): value} by loops over rows, chain starts, steps."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params())
  h, _ = TRUNK.apply({"params": params()["trunk"]}, BATCH["tokens"], BATCH["segment_ids"], BATCH["positions"])
  h, table, head, x = np.asarray(h, np.float64), p["trunk"]["embed"], p["trunk"]["head"], BATCH["tokens"]
  sums = {k: np.zeros(HORIZON + 1) for k in ("mse", "cosine", "ce")}
  counts = {k: np.zeros(HORIZON + 1) for k in ("h", "tok")}
  for b in range(B):
    for t in range(L):
      cur = h[b, t]
      for i in range(1, HORIZON + 1):
        s = t + i
        if s >= L:
          break
        cur = np_psi(p["dynamics"], cur, table[x[b, s]])
        if not M_H[i][b, t]:
          continue
        counts["h"][i] += 1
        sums["mse"][i] += np.mean((cur - h[b, s]) ** 2)
        sums["cosine"][i] += 1 - cur @ h[b, s] / (np.linalg.norm(cur) * np.linalg.norm(h[b, s]))
        if t < L - i - 1 and M_KL[i][b, t]:
          z = cur @ head
          counts["tok"][i] += 1
          sums["ce"][i] += np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[x[b, s + 1]]
  return {k: sum(sums[k][i] / counts[n][i] for i in range(1, HORIZON + 1)) / HORIZON
          for k, n in (("mse", "h"), ("cosine", "h"), ("ce", "tok"))}


# ----------------------------------------------------------------------------------------------------
# Tests

def test_defaults_are_the_papers_and_validated():
  o = base_config().objective
  assert (o.next_h_stop_gradient, o.kl_frozen_head, o.token_loss, o.next_h_loss, o.eos_mask) == (
      True, True, "kl", "smooth_l1", "transition")
  for key, bad in (("token_loss", "mse"), ("next_h_loss", "l2"), ("kl_frozen_head", "yes")):
    c = make_config()
    del c.objective[key]  # (ml_collections would refuse a type change)
    c.objective[key] = bad
    with pytest.raises(ConfigError, match=f"objective.{key}="):
      validate(c, num_devices=1)
  validate(make_config(**{"token_loss": "ce", "next_h_loss": "cosine"}), num_devices=1)


def test_default_switches_equal_a_config_without_the_keys():
  """Saved configs from before the switches existed (read over base_config) build the same objective."""
  c = make_config()
  for key in DEFAULTS:
    del c.objective[key]
  c = from_saved(c.to_dict())
  assert all(c.objective[key] == value for key, value in DEFAULTS.items())
  assert c.objective.to_dict() == make_config().objective.to_dict()
  _, metrics = jax.jit(objectives.build(c).loss, compiler_options=FAST)(params(), BATCH, jax.random.PRNGKey(0))
  reference = run()[0]  # from the value-and-grad program: XLA may order its reductions differently
  assert metrics.keys() == reference.keys()
  for k in reference:
    np.testing.assert_allclose(metrics[k], reference[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("switches", [
    {}, {"next_h_stop_gradient": False}, {"kl_frozen_head": False}, {"token_loss": "ce"},
    {"token_loss": "ce", "kl_frozen_head": False}, {"token_loss": "none"}, {"next_h_loss": "mse"},
    {"next_h_loss": "cosine"}])
def test_loss_and_gradient_match_the_reference(switches):
  metrics, grads, (ref, ce, nh, tok), ref_grads = run(**switches)
  np.testing.assert_allclose(float(metrics["loss"]), ref, rtol=1e-5)
  np.testing.assert_allclose([float(metrics["ce"]), float(metrics["next_h"])], [ce, nh], rtol=1e-5)
  token_key = {"kl": "kl", "ce": "latent_ce", "none": None}[switches.get("token_loss", "kl")]
  assert {"kl", "latent_ce"} & set(metrics) == ({token_key} if token_key else set())
  if token_key:
    np.testing.assert_allclose(float(metrics[token_key]), tok, rtol=1e-5)
    assert tok > 1e-2
  assert_trees_close(grads, ref_grads, what=str(switches))


def test_new_terms_equal_naive_per_chain_loops():
  naive = naive_terms()
  np.testing.assert_allclose(float(run(next_h_loss="mse")[0]["next_h"]), naive["mse"], rtol=1e-5)
  np.testing.assert_allclose(float(run(next_h_loss="cosine")[0]["next_h"]), naive["cosine"], rtol=1e-5)
  np.testing.assert_allclose(float(run(token_loss="ce")[0]["latent_ce"]), naive["ce"], rtol=1e-5)
  # the cosine term is on the Smooth L1 scale (same order of magnitude), MSE is not Smooth L1
  smooth = float(run()[0]["next_h"])
  assert 0.1 < naive["cosine"] / smooth < 10 and abs(naive["mse"] - smooth) > 1e-3


def test_next_h_stop_gradient_adds_only_the_target_branch_to_the_trunk():
  """Without the stop-gradient, the target branch (through the trunk's h_{t+i}) joins the trunk's
  gradient; p_psi and the head gradients are unchanged."""
  g_on, g_off = run()[1], run(next_h_stop_gradient=False)[1]
  delta = diff(g_off, g_on)
  assert max_abs(delta["dynamics"]) < 1e-6 * max_abs(g_on["dynamics"])
  assert max_abs(delta["trunk"]["head"]) < 1e-6 * max_abs(g_on["trunk"]["head"])
  for name in ("blocks", "final_norm", "embed"):
    assert max_abs(delta["trunk"][name]) > 1e-2 * max_abs(g_on["trunk"][name]), name


@pytest.mark.parametrize("token_loss", ["kl", "ce"])
def test_kl_frozen_head_moves_only_the_head_gradient(token_loss):
  """Frozen: the token-space term gives the head nothing (its head gradient is exactly the CE one, the
  token_loss = none run); unfrozen: the head gets a large extra gradient, nothing else changes."""
  g_frozen, g_free = run(token_loss=token_loss)[1], run(token_loss=token_loss, kl_frozen_head=False)[1]
  g_none = run(token_loss="none")[1]
  np.testing.assert_allclose(np.asarray(g_frozen["trunk"]["head"]), np.asarray(g_none["trunk"]["head"]),
                             rtol=1e-5, atol=1e-7 * max_abs(g_none["trunk"]["head"]))
  delta = diff(g_free, g_frozen)
  assert max_abs(delta["trunk"]["head"]) > 1e-2 * max_abs(g_frozen["trunk"]["head"])
  assert max_abs(delta["dynamics"]) < 1e-6 * max_abs(g_frozen["dynamics"])
  for name in ("blocks", "embed", "final_norm"):
    assert max_abs(delta["trunk"][name]) < 1e-6 * max_abs(g_frozen["trunk"][name]), name


def test_token_loss_none_drops_the_term():
  metrics, grads = run(token_loss="none")[:2]
  np.testing.assert_allclose(float(metrics["loss"]), float(metrics["ce"]) + LAM_H * float(metrics["next_h"]),
                             rtol=1e-6)
  assert max_abs(diff(grads, run()[1])["dynamics"]) > 1e-3 * max_abs(grads["dynamics"])  # KL no longer trains p_psi
