"""Token-weighted gradient accumulation: `microbatches=4` gives the full batch's loss, metrics and gradients.

Rows have different EOS rates, prompt masks and tail padding, so every term's mask count (next-h and KL
masks drop EOS transitions; MTP / JTP windows drop EOS crossings; BST pairs stop at EOS) differs between
the microbatches (rows i, i+4). The old weighting (the mean of the microbatches' own masked means) is
computed on the same rows and shown to miss by 1e-4 .. 1e-3 (loss) and 1e-1 (gradients), so the
comparison is not vacuous; BST's "row" mode is the exception: it was already exact (equal rows).
Tolerance 1e-6: scalars relative to max(|value|, 1) (`scalar_err`), gradients relative to each leaf's
max |g|; measured float32 noise 1e-7 .. 8e-7 at init std 0.02 (with larger weights the forward itself
differs by 1e-6 between batch shapes). Scalar leaves are one sum over every position: JTP's Fetch gamma
gradient cancels to 0.6 of its terms' magnitude and moves by 1.3e-6 under a mere row permutation of the
full batch, so they get 1e-5; so do other leaves of at most SUM_LEAF entries, each entry one sum over every
position (JTP's slot bias: 1.07e-6 since the vocabulary losses compute their gradients in the forward pass,
objectives/vocab_losses.py).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextlat_jax import config as config_lib
from nextlat_jax import objectives
from nextlat_jax.train import step as step_lib
from tests.tiny import contract_fields, random_rows, tiny_config

V, D, B, L, EOS, PAD, K = 13, 16, 8, 16, 1, 0, 4
TOL = 1e-6
TOL_SCALAR_LEAF = 1e-5
SUM_LEAF = 64  # entries; below B * L = 128 positions
FAST = {"xla_backend_optimization_level": 0}
RNG = jax.random.PRNGKey(0)
CASES = {
    "nextlat_d1": ("nextlat", dict(horizon=1)),
    "nextlat_d2": ("nextlat", dict(horizon=2)),
    "nextlat_d2_chain_ce": ("nextlat", dict(horizon=2, eos_mask="chain", token_loss="ce")),
    "gpt": ("gpt", {}),
    "mtp": ("mtp", dict(horizon=2, lambda_mtp=0.7)),
    "mtp_deepseek": ("mtp_deepseek", dict(horizon=2, lambda_mtp=0.7)),
    "jtp": ("jtp", dict(horizon=2, lambda_mtp=0.7)),
    "bst_row": ("bst", dict(bst_normalize="row")),
    "bst_pair": ("bst", dict(bst_normalize="pair")),
}


def make_batch() -> dict:
  """B packed rows; microbatch j = rows j, j+K. EOS rate by microbatch 0.05 .. 0.4, padding in two."""
  rng = np.random.default_rng(0)
  rates = (0.05, 0.4, 0.15, 0.25)
  tokens = np.concatenate([random_rows(rng, 1, L, V, EOS, rates[r % K]) for r in range(B)])
  valid = np.ones((B, L), bool)
  valid[1, L - 5:] = valid[6, L - 3:] = False
  return {k: jnp.asarray(v) for k, v in contract_fields(tokens, valid, EOS, PAD).items()}


def make_objective(name: str, options: dict) -> objectives.Objective:
  c = tiny_config(vocab=V, d_model=D, batch=B, eos=EOS)
  c.objective.update(name=name, **options)
  config_lib.validate(c, 1)
  return objectives.build(c)


@functools.lru_cache(maxsize=None)
def results(case: str) -> dict:
  """The objective, params, and ((loss, metrics), grads) for k = 1, k = K and the old weighting."""
  obj = make_objective(*CASES[case])
  params = nn.unbox(jax.jit(obj.init, compiler_options=FAST)(jax.random.PRNGKey(1)))
  batch = make_batch()
  run = lambda k: jax.jit(lambda p, b: step_lib.loss_and_grads(p, b, RNG, obj, k), compiler_options=FAST)
  one = jax.jit(jax.value_and_grad(obj.loss, has_aux=True), compiler_options=FAST)
  micro = [jax.tree.map(lambda x, j=j: x[j::K], batch) for j in range(K)]
  naive = [one(params, mb, jax.random.fold_in(RNG, j)) for j, mb in enumerate(micro)]
  return {"obj": obj, "micro": micro, "full": run(1)(params, batch), "accum": run(K)(params, batch),
          "naive": jax.tree.map(lambda *xs: sum(xs) / K, *naive)}


def scalar_err(a: jax.Array, b: jax.Array) -> float:
  """|a - b| / max(|b|, 1): losses are O(1) means of log-probabilities (log V = 2.6), and a small term
  such as KL is a difference of two of them, so its float32 noise is absolute (1.4e-6 of a KL of 0.015)."""
  return float(abs(a - b) / max(abs(float(b)), 1.0))


def grad_errs(a, b) -> list[tuple[str, int, float]]:
  """(leaf path, size, max |a - b| / max |b|) for every leaf."""
  return [(jax.tree_util.keystr(path), y.size, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
          for (path, y), x in zip(jax.tree_util.tree_leaves_with_path(b), jax.tree.leaves(a))]


def grad_err(a, b) -> float:
  return max(e for _, _, e in grad_errs(a, b))


def assert_grads_close(a, b) -> None:
  for path, size, err in grad_errs(a, b):
    assert err <= (TOL if size > SUM_LEAF else TOL_SCALAR_LEAF), (path, err)


@pytest.mark.parametrize("case", list(CASES))
def test_accumulated_equals_full_batch(case):
  r = results(case)
  (loss_f, met_f), g_f = r["full"]
  (loss_a, met_a), g_a = r["accum"]
  assert sorted(met_a) == sorted(met_f)
  assert scalar_err(loss_a, loss_f) <= TOL, (float(loss_a), float(loss_f))
  for key in met_f:
    assert scalar_err(met_a[key], met_f[key]) <= TOL, (key, float(met_a[key]), float(met_f[key]))
  assert_grads_close(g_a, g_f)


@pytest.mark.parametrize("case", list(CASES))
def test_old_weighting_differs(case):
  """Every term's count differs between the microbatches, and the mean of per-microbatch means misses
  the full-batch loss and gradients by far more than TOL on these rows (BST "row": a mean over rows,
  and every microbatch has B / K rows, so the old weighting was exact there)."""
  r = results(case)
  per_mb = [jax.jit(r["obj"].counts)(mb) for mb in r["micro"]]
  for key in per_mb[0]:
    if key != "rows":
      assert len({float(c[key]) for c in per_mb}) > 1, key
  (loss_f, _), g_f = r["full"]
  (loss_n, _), g_n = r["naive"]
  if case == "bst_row":
    assert scalar_err(loss_n, loss_f) <= TOL
    assert_grads_close(g_n, g_f)
    return
  assert scalar_err(loss_n, loss_f) > 30 * TOL, (float(loss_n), float(loss_f))
  assert grad_err(g_n, g_f) > 1e4 * TOL


def test_counts_are_the_loss_denominators():
  """loss(batch, counts(batch)) is loss(batch) bit for bit: counts name each term's own denominator."""
  obj = make_objective("nextlat", dict(horizon=2))
  params = nn.unbox(jax.jit(obj.init, compiler_options=FAST)(jax.random.PRNGKey(1)))
  batch = make_batch()
  f = jax.jit(obj.loss, compiler_options=FAST)
  own, given = f(params, batch, RNG), f(params, batch, RNG, jax.jit(obj.counts)(batch))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(a == b), own, given))
  with pytest.raises(KeyError):
    f(params, batch, RNG, {"ce": jnp.float32(1.0)})


def test_sharded_accumulation_equals_full_batch():
  """The same on a (data 2, tensor 2) mesh (quickstart's nextlat, d_model 64), through the microbatch
  sharding constraint: each microbatch has one row on each data shard."""
  from tests.test_checkpoint import _config, _setup
  config = _config()
  config.batch_size = B
  assert int(config.data.eos_id) == EOS and int(config.model.vocab_size) >= V
  setup = _setup(config, jax.devices()[:4], data=2, fsdp=1, tensor=2)
  params = setup.init(jax.random.PRNGKey(0)).params
  batch = jax.device_put(make_batch(), setup.batch_sharding)
  run = lambda k: jax.jit(lambda p, b: step_lib.loss_and_grads(p, b, RNG, setup.objective, k, setup.batch_sharding),
                          compiler_options=FAST)(params, batch)
  ((loss_f, met_f), g_f), ((loss_a, met_a), g_a) = run(1), run(K)
  assert scalar_err(loss_a, loss_f) <= TOL, (float(loss_a), float(loss_f))
  for key in met_f:
    assert scalar_err(met_a[key], met_f[key]) <= TOL, (key, float(met_a[key]), float(met_f[key]))
  assert_grads_close(g_a, g_f)
