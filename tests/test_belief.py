"""The HMM belief-state task (nextlat_jax.data.tasks.hmm) and its metric (nextlat_jax.eval.metrics.belief).

- The forward algorithm's beliefs, next-symbol distributions and likelihoods equal brute-force sums over
  every hidden path; sampled sequences follow the same law (mean log-likelihood = minus mean entropy).
- The probe: R^2 = 1 for the true beliefs or an invertible affine map of them, about 0 for noise; the
  pooled R^2 and the ridge solution by hand. KL = 0 for the true predictive distribution.
- The source's batches satisfy the batch contract; the metric runs on a model through `nextlat eval`'s
  registry entry.
"""
import itertools
import math

import jax
import numpy as np
import pytest

from nextlat_jax.config import load_config_file
from nextlat_jax.data import packing, pipeline
from nextlat_jax.data.tasks import hmm as hmm_lib
from nextlat_jax.eval import TASK_METRICS
from nextlat_jax.eval.metrics import belief


def small_hmm(seed=0, K=3, M=2):
  rng = np.random.default_rng(seed)
  return hmm_lib.HMM(rng.dirichlet(np.ones(K)), rng.dirichlet(np.full(K, 0.7), K), rng.dirichlet(np.full(M, 0.7), K))


def brute_force(h: hmm_lib.HMM, x: np.ndarray) -> tuple[np.ndarray, float]:
  """P(z_t | x_1..x_t) and P(x_1..x_t) by summing over all hidden paths z_0..z_t."""
  K, t = h.n_states, len(x)
  post, total = np.zeros(K), 0.0
  for z in itertools.product(range(K), repeat=t + 1):
    p = h.pi[z[0]]
    for s in range(1, t + 1):
      p *= h.A[z[s - 1], z[s]] * h.B[z[s], x[s - 1]]
    post[z[-1]] += p
    total += p
  return post / total, total


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_equals_brute_force(seed):
  h = small_hmm(seed)
  rng = np.random.default_rng(seed + 10)
  x = rng.integers(0, 2, size=(6, 5))
  b, p, loglik = h.forward(x)
  assert b.shape == (6, 6, 3) and p.shape == (6, 6, 2)
  for n in range(len(x)):
    np.testing.assert_allclose(b[n, 0], h.pi, atol=1e-12)
    for t in range(1, 6):
      post, lik = brute_force(h, x[n, :t])
      np.testing.assert_allclose(b[n, t], post, atol=1e-6)
      _, lik_next = zip(*[brute_force(h, np.append(x[n, :t], v)) for v in range(2)])
      np.testing.assert_allclose(p[n, t], np.asarray(lik_next) / lik, atol=1e-6)  # P(x_{t+1} | x_1..x_t)
    np.testing.assert_allclose(loglik[n], math.log(brute_force(h, x[n])[1]), atol=1e-9)
  np.testing.assert_allclose(b.sum(-1), 1.0, atol=1e-12)
  # Long sequences stay normalised and finite (no underflow).
  b, _, loglik = h.forward(rng.integers(0, 2, size=(2, 5000)))
  assert np.all(np.isfinite(b)) and np.all(np.isfinite(loglik)) and loglik.max() < -100


def test_samples_follow_the_forward_law():
  cfg = hmm_lib.default_data_config()
  src = hmm_lib.make_source(cfg, split="eval", seed=0)
  h = hmm_lib.hmm(cfg)
  x = np.stack([src.sequence(i)[1] for i in range(300)])
  _, p, _ = h.forward(x)
  T = x.shape[1]
  logp_next = np.log(np.take_along_axis(p[:, :T], x[:, :, None], axis=-1)[..., 0])  # log P(x_{t+1} | x_1..x_t)
  # For x ~ the model, E[log p(x_{t+1})] = -E[H(p_t)]: a sampler with another convention (e.g. z_0 emitting)
  # would be scored lower. Standard error about 0.006 here.
  assert abs(logp_next.mean() - (-belief.entropy(p[:, :T].reshape(-1, p.shape[-1])))) < 0.03
  z, xs = src.sequence(7)
  assert z.shape == (T + 1,) and xs.shape == (T,)
  assert np.all(h.B[z[1:], xs] > 0) and np.all(h.A[z[:-1], z[1:]] > 0)  # only possible transitions / emissions


def test_r2_and_ridge_by_hand():
  assert belief.r2_score(np.array([[0.0], [2.0]]), np.array([[1.0], [1.0]])) == 0.0
  y = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
  pred = y + np.array([[1.0, 0.0], [0.0, 0.0], [0.0, -1.0]])
  assert belief.r2_score(y, pred) == pytest.approx(1 - 2 / 16)  # SST = 8 + 8, pooled
  rng = np.random.default_rng(0)
  x, yy = rng.normal(size=(50, 4)), rng.normal(size=(50, 2))
  W, c = belief.ridge_fit(x, yy, 0.3)
  xc, yc = x - x.mean(0), yy - yy.mean(0)
  W_ref = np.linalg.solve(xc.T @ xc + 0.3 * 50 * np.eye(4), xc.T @ yc)
  np.testing.assert_allclose(W, W_ref, atol=1e-12)
  np.testing.assert_allclose(c, yy.mean(0) - x.mean(0) @ W_ref, atol=1e-12)


def test_probe_r2_is_one_for_beliefs_and_zero_for_noise():
  cfg = hmm_lib.default_data_config()
  src = hmm_lib.make_source(cfg, split="eval", seed=0)
  x = np.stack([src.sequence(i)[1] for i in range(200)])
  b, _, _ = hmm_lib.hmm(cfg).forward(x)
  K = b.shape[-1]
  flat = lambda a: a[:, :-1].reshape(-1, a.shape[-1])
  b_fit, b_test = flat(b[:100]), flat(b[100:])
  r2, r2_fit = belief.probe_r2(b_fit, b_fit, b_test, b_test, ridge=0.0)
  assert abs(r2 - 1) < 1e-6 and abs(r2_fit - 1) < 1e-6
  rng = np.random.default_rng(1)
  Q, shift = rng.normal(size=(K, 32)), rng.normal(size=32)  # invertible on the belief simplex (rank K)
  r2, _ = belief.probe_r2(b_fit @ Q + shift, b_fit, b_test @ Q + shift, b_test, ridge=0.0)
  assert abs(r2 - 1) < 1e-6
  r2, _ = belief.probe_r2(b_fit @ Q + shift, b_fit, b_test @ Q + shift, b_test, ridge=1e-9)
  assert abs(r2 - 1) < 1e-6
  noise_fit, noise_test = rng.normal(size=(len(b_fit), 16)), rng.normal(size=(len(b_test), 16))
  r2, _ = belief.probe_r2(noise_fit, b_fit, noise_test, b_test, ridge=1e-4)
  assert abs(r2) < 0.02


def test_kl():
  p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
  logq = np.log(np.concatenate([p, np.zeros((2, 1))], axis=1) + 1e-300)  # the EOS column has no mass
  assert belief.mean_kl(p, logq) == pytest.approx(0.0, abs=1e-12)
  q = np.log(np.array([[0.25, 0.5, 0.25, 0.0], [0.2, 0.3, 0.4, 0.1]]) + 1e-300)
  want = (0.5 * math.log(2) + 0.5 * math.log(1)) / 2 + (0.5 * math.log(0.5 / 0.4)) / 2
  assert belief.mean_kl(p, q) == pytest.approx(want, rel=1e-12)


def test_batches_satisfy_the_contract():
  cfg = hmm_lib.default_data_config()
  cfg.update(seq_len=16, eval_rows=64)
  info = pipeline.dataset_info(cfg)
  M = int(cfg.n_symbols)
  assert (info.vocab_size, info.eos_id, info.row_len) == (M + 1, M, 17)
  for split in ("train", "eval"):
    ds = pipeline.make_dataset(cfg, split=split, global_batch_size=8, seed=3, process_index=0, process_count=1)
    batch = ds[1]
    assert set(batch) == set(packing.FIELDS)
    assert all(v.shape == (8, 17) and v.dtype == np.int32 for v in batch.values())
    tokens = batch["tokens"]
    assert np.all(tokens[:, 0] == M) and np.all((tokens[:, 1:] >= 0) & (tokens[:, 1:] < M))
    ref = packing.pack_row_fields(tokens, M, context_length=None)
    for k in packing.FIELDS:
      np.testing.assert_array_equal(batch[k], ref[k], err_msg=k)
    np.testing.assert_array_equal(batch["positions"][0], np.arange(17))
    np.testing.assert_array_equal(batch["loss_mask"][0], [0] + [1] * 16)
    assert np.all(batch["segment_ids"] == 1)
    again = pipeline.make_dataset(cfg, split=split, global_batch_size=8, seed=3, process_index=0, process_count=1)
    np.testing.assert_array_equal(again[1]["tokens"], tokens)  # a pure function of (config, seed, step)
    other = pipeline.make_dataset(cfg, split=split, global_batch_size=8, seed=4, process_index=0, process_count=1)
    assert np.array_equal(other[1]["tokens"], tokens) == (split == "eval")  # eval rows ignore the run seed
  with pytest.raises(ValueError, match="data.n_states"):
    pipeline.dataset_info(dict_cfg(cfg, n_states=0))


def dict_cfg(cfg, **kw):
  c = cfg.copy_and_resolve_references()
  c.update(**kw)
  return c


def load_config(arg):
  return load_config_file("hmm_belief", arg)


def test_metric_runs_on_a_model():
  from nextlat_jax.eval.run import TaskRun
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.run import Run
  from nextlat_jax.train import preflight, step as step_lib
  assert TASK_METRICS["hmm"] == "nextlat_jax.eval.metrics.belief:task"
  with pytest.raises(ValueError, match="configs/hmm_belief.py"):
    load_config("gpt,adam")
  c = load_config("nextlat,muon")
  assert c.optimizer.name == "muon" and c.objective.name == "nextlat"
  c = load_config("gpt")
  c.data.update(seq_len=12)
  c.model.update(d_model=16, n_layer=1, n_head=2, ffn_width=32)
  cfg, info = preflight.resolve(c)
  assert cfg.model.vocab_size == info.vocab_size == 4
  mesh = make_mesh(cfg.mesh, jax.devices()[:2])
  params = step_lib.build(cfg, mesh).init(jax.random.PRNGKey(0)).params
  run = TaskRun(Run.from_params(cfg, params, mesh), out_dir="", num_samples=8, batch_size=4, show_progress=False)
  out = belief.task(run)
  assert out["num_rows_fit"] == 4 and out["num_rows_test"] == 4 and out["positions_per_row"] == 12
  assert len(out["next_symbol_kl_by_position"]) == 12
  assert out["belief_r2"] <= 1.0 and out["next_symbol_kl"] > 0 and 1.0 <= out["erank"] <= 16
  assert 0 < out["next_symbol_entropy"] < math.log(3) and 0 < out["next_symbol_ce_exact"] < out["next_symbol_ce"]
