"""Belief-state metrics on the HMM task (nextlat_jax.data.tasks.hmm; a project metric, not in the paper).

On held-out sequences, at every column t = 0..T-1 (the state that has read x_1..x_t and predicts x_{t+1}):

- Linear probe R^2. A ridge regression with bias, y ~ h W + c, is fitted in closed form from the
  model's representation h_t (D) to the exact belief b_t = P(z_t | x_1..x_t) (K) on the first half of
  the rows, and scored on the second half:
      R^2 = 1 - SSE / SST,  SSE = sum_{n,k} (y_nk - yhat_nk)^2,  SST = sum_{n,k} (y_nk - ybar_k)^2,
  pooled over all held-out samples n (rows x positions) and belief coordinates k, with ybar_k the
  held-out mean of coordinate k. 1 = the belief is a linear function of h; 0 = no better than the
  mean belief (negative: worse). The penalty is per sample: the fit minimises
  mean_n ||y_n - h_n W - c||^2 + ridge ||W||^2 (c is not penalised); ridge = data.belief_ridge.
- Next-symbol KL: the mean over held-out samples of KL(p_t || q_t) in nats, p_t = P(x_{t+1} | x_1..x_t)
  the true predictive distribution, q_t the model's next-token distribution over its whole vocabulary
  (mass it puts on EOS counts against it).
- Effective rank of the held-out h (nextlat_jax.eval.metrics.rank; METRICS.md §6).
- Next-symbol CE of the model on the held-out samples, and of the exact HMM (p_t) on the same samples
  (the lowest achievable in expectation; CE - CE_exact estimates the KL from the sampled symbols).
- References that need no model: the mean entropy of p_t and the R^2 of the same probe from the true
  next-symbol distribution p_t to b_t (how much of the belief a perfect next-token predictor's output
  already explains linearly).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from nextlat_jax.data import pipeline
from nextlat_jax.data.packing import segment_ids_and_positions
from nextlat_jax.data.tasks import hmm as hmm_lib
from nextlat_jax.eval.metrics import make_jit, map_batches, next_token_logits
from nextlat_jax.eval.metrics import rank as rank_lib


def ridge_fit(x_NxD: np.ndarray, y_NxK: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
  """(W (D, K), c (K,)) minimising mean ||y - x W - c||^2 + ridge ||W||^2, in float64 via the SVD of
  the centred inputs (ridge = 0: the minimum-norm least-squares solution)."""
  x, y = np.asarray(x_NxD, np.float64), np.asarray(y_NxK, np.float64)
  if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 2:
    raise ValueError(f"ridge_fit: need x (N, D) and y (N, K) with N >= 2, got {x.shape} and {y.shape}")
  if ridge < 0:
    raise ValueError(f"ridge={ridge!r}: must be >= 0")
  x_mean, y_mean = x.mean(0), y.mean(0)
  u, s, vt = np.linalg.svd(x - x_mean, full_matrices=False)
  lam = ridge * len(x)
  keep = s > (1e-12 * s[0] if s.size and s[0] > 0 else np.inf)  # drop null directions of x
  inv = np.where(keep, s / np.where(keep, s ** 2 + lam, 1.0), 0.0)
  W = vt.T @ (inv[:, None] * (u.T @ (y - y_mean)))
  return W, y_mean - x_mean @ W


def r2_score(y_true_NxK: np.ndarray, y_pred_NxK: np.ndarray) -> float:
  """1 - SSE / SST pooled over samples and coordinates (SST around each coordinate's mean)."""
  y, p = np.asarray(y_true_NxK, np.float64), np.asarray(y_pred_NxK, np.float64)
  sst = float(np.sum((y - y.mean(0)) ** 2))
  if sst <= 0.0:
    raise ValueError("r2_score: the targets are constant (SST = 0)")
  return 1.0 - float(np.sum((y - p) ** 2)) / sst


def probe_r2(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, ridge: float
             ) -> tuple[float, float]:
  """(held-out R^2, R^2 on the fit split) of a ridge probe fitted on (x_fit, y_fit)."""
  W, c = ridge_fit(x_fit, y_fit, ridge)
  return r2_score(y_test, np.asarray(x_test, np.float64) @ W + c), r2_score(y_fit, np.asarray(x_fit) @ W + c)


def mean_kl(p_true_NxM: np.ndarray, logq_NxV: np.ndarray) -> float:
  """Mean over samples of KL(p || q) (nats); p covers the first M of q's V entries, 0 log 0 = 0."""
  p = np.asarray(p_true_NxM, np.float64)
  logq = np.asarray(logq_NxV, np.float64)[:, :p.shape[1]]
  logp = np.log(np.where(p > 0, p, 1.0))
  return float(np.mean(np.sum(np.where(p > 0, p * (logp - logq), 0.0), axis=1)))


def entropy(p_NxM: np.ndarray) -> float:
  p = np.asarray(p_NxM, np.float64)
  return float(np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)))


def scores(h_fit: np.ndarray, b_fit: np.ndarray, h_test: np.ndarray, b_test: np.ndarray,
           p_fit: np.ndarray, p_test: np.ndarray, logq_test: np.ndarray, ridge: float) -> dict[str, float]:
  """All belief metrics from flattened samples: h (N, D), beliefs b (N, K), true next-symbol
  distributions p (N, M) and the model's next-token log-probabilities logq (N, V)."""
  r2, r2_fit = probe_r2(h_fit, b_fit, h_test, b_test, ridge)
  r2_ref, _ = probe_r2(p_fit, b_fit, p_test, b_test, ridge)
  rank = rank_lib.erank_of_batches([np.asarray(h_test)])
  return {"belief_r2": r2, "belief_r2_fit_split": r2_fit, "next_symbol_kl": mean_kl(p_test, logq_test),
          "erank": rank["erank"], "numerical_rank": rank["numerical_rank"], "dim": rank["dim"],
          "next_symbol_entropy": entropy(p_test), "belief_r2_from_true_next_symbol": r2_ref}


def model_outputs(config: Any, objective: Any, params: Any, tokens_NxL: np.ndarray, batch_size: int = 256,
                  progress: Any = lambda it: it) -> tuple[np.ndarray, np.ndarray]:
  """(h (N, L, D), log-softmax next-token distributions (N, L, V)) of the objective on these rows."""
  eos_id = int(config.data.eos_id)

  def fn(params, tokens_BxL):
    seg_BxL, pos_BxL = segment_ids_and_positions(tokens_BxL, eos_id)
    batch = {"tokens": tokens_BxL, "segment_ids": seg_BxL, "positions": pos_BxL,
             "loss_mask": (pos_BxL > 0).astype(tokens_BxL.dtype)}
    logits = next_token_logits(config, objective, params, tokens_BxL, seg_BxL, pos_BxL)
    return objective.hidden(params, batch).astype(np.float32), jax.nn.log_softmax(logits.astype(np.float32), -1)

  jitted = make_jit(objective, fn)
  h, logq = map_batches(config, objective, lambda b, x: jitted(params, x), [tokens_NxL], batch_size, progress)
  return h, logq


def evaluate(config: Any, objective: Any, params: Any, *, num_rows: int | None = None, batch_size: int = 256,
             progress: Any = lambda it: it) -> dict[str, Any]:
  """Belief metrics on the first `num_rows` (default data.belief_rows) eval rows: probe fitted on the
  first half, everything scored on the second half."""
  data = config.data
  n = int(data.get("belief_rows", 1024) if num_rows is None else num_rows)
  ridge = float(data.get("belief_ridge", 1e-4))
  src = pipeline.make_source(data, split="eval", seed=int(config.seed))
  if not 4 <= n <= len(src):
    raise ValueError(f"belief rows={n}: must be in [4, data.eval_rows={len(src)}]")
  tokens = np.stack([src[i]["tokens"] for i in range(n)])
  T = tokens.shape[1] - 1
  b, p, _ = hmm_lib.hmm(data).forward(tokens[:, 1:])
  h, logq = model_outputs(config, objective, params, tokens, batch_size, progress)
  flat = lambda a, rows: a[rows, :T].reshape(-1, a.shape[-1])
  fit, test = slice(0, n // 2), slice(n // 2, n)
  out = scores(flat(h, fit), flat(b, fit), flat(h, test), flat(b, test), flat(p, fit), flat(p, test),
               flat(logq, test), ridge)
  kl_by_t = [mean_kl(p[test, t], logq[test, t]) for t in range(T)]
  x_next = tokens[test, 1:, None]  # x_{t+1} at column t
  out["next_symbol_ce"] = -float(np.mean(np.take_along_axis(logq[test, :T], x_next, axis=-1)))
  out["next_symbol_ce_exact"] = -float(np.mean(np.log(np.take_along_axis(p[test, :T], x_next, axis=-1))))
  out.update(num_rows_fit=n // 2, num_rows_test=n - n // 2, positions_per_row=T, ridge=ridge,
             next_symbol_kl_by_position=kl_by_t, n_states=int(data.n_states), n_symbols=int(data.n_symbols))
  return out


def task(run: Any) -> dict[str, Any]:
  """`nextlat eval` entry (nextlat_jax.eval.TASK_METRICS) for data.name = "hmm": a restored
  nextlat_jax.eval.run.TaskRun; --num_samples sets the number of held-out rows (fit + test)."""
  return evaluate(run.config, run.objective, run.params, num_rows=run.num_samples, batch_size=run.batch_size,
                  progress=lambda it: run.progress(it, "belief"))
