"""Sequences of a random hidden Markov model with their exact belief states (forward algorithm), as a
data source for `nextlat_jax.data.pipeline` (`data.name = "hmm"`; a project task, not in the paper).

The HMM (fixed by `hmm_seed`): K hidden states, M symbols; transition rows A[i] ~ Dirichlet(alpha_A 1_K),
emission rows B[i] ~ Dirichlet(alpha_B 1_M); the initial state z_0 is uniform and emits nothing. For
t = 1..T: z_t ~ A[z_{t-1}], x_t ~ B[z_t]. Small concentrations give sparse rows (near-deterministic
dynamics observed through ambiguous symbols), so the posterior over z_t depends on the whole prefix.

Belief state b_t = P(z_t | x_1..x_t) (b_0 = the uniform prior), from the normalised forward recursion
u_t = (b_{t-1} A) * B[:, x_t], c_t = sum(u_t) = P(x_t | x_<t), b_t = u_t / c_t, in float64. The predictive
next-symbol distribution is p_t = P(x_{t+1} | x_1..x_t) = b_t A B.

Row (seq_len + 1 = T + 1 columns): tokens = [EOS, x_1 .. x_T] with symbols 0..M-1 and EOS = M (it
acts as BOS: column 0 holds the state of the empty prefix, whose belief is the prior); one sequence per
row, no padding; segment_ids 1, positions 0..T; loss_mask 1 on columns 1..T (every symbol is a target).
Column t's hidden state has read x_1..x_t, so it is compared with b_t and predicts p_t (t = 0..T-1).

Train row i is sequence (data_seed, 0, seed, i) (fresh sequences: `num_rows` is nominal); eval row i is
sequence (data_seed, 1, i), the same for every run seed. Sequence (..) means numpy's default_rng seeded
by that tuple.
"""
from __future__ import annotations

import functools
import operator

import ml_collections
import numpy as np

from nextlat_jax.data.dataset_info import SPLITS, DatasetInfo, need
from nextlat_jax.data.packing import pack_row_fields


def default_data_config() -> ml_collections.ConfigDict:
  """A small HMM whose belief needs the history: more states than symbols, sparse rows (the belief metric
  reports how much of the belief the exact next-symbol distribution already explains)."""
  return ml_collections.ConfigDict({
      "name": "hmm",
      "n_states": 12,  # K
      "n_symbols": 3,  # M; the vocabulary is M + 1 (EOS = M)
      "transition_concentration": 0.1,  # alpha_A of the Dirichlet transition rows
      "emission_concentration": 0.1,  # alpha_B of the Dirichlet emission rows
      "hmm_seed": 0,  # fixes A and B
      "data_seed": 0,  # fixes the sequences
      "seq_len": 64,  # T
      "num_rows": 1 << 24,  # nominal train length (sequences are drawn on the fly)
      "eval_rows": 4096,
      # The belief metric (nextlat_jax.eval.metrics.belief) on held-out rows: the probe is fitted on the
      # first half of `belief_rows` eval rows and scored on the second half.
      "belief_rows": 1024,
      "belief_ridge": 1e-4,  # ridge penalty per sample: minimise mean ||y - hW - c||^2 + ridge ||W||^2
  })


class HMM:
  """Initial distribution pi (K,), transitions A (K, K), emissions B (K, M); rows sum to 1 (float64)."""

  def __init__(self, pi: np.ndarray, A: np.ndarray, B: np.ndarray):
    self.pi, self.A, self.B = (np.asarray(x, np.float64) for x in (pi, A, B))
    self.n_states, self.n_symbols = self.B.shape
    self._cum_pi, self._cum_A, self._cum_B = np.cumsum(self.pi), np.cumsum(self.A, 1), np.cumsum(self.B, 1)

  def sample(self, rng: np.random.Generator, T: int) -> tuple[np.ndarray, np.ndarray]:
    """(hidden states z_0..z_T (T+1,), symbols x_1..x_T (T,)), int32."""
    u = rng.random((T + 1, 2))
    K, M = self.n_states, self.n_symbols
    z = np.empty(T + 1, np.int32)
    x = np.empty(T, np.int32)
    z[0] = min(int(np.searchsorted(self._cum_pi, u[0, 0], side="right")), K - 1)
    for t in range(1, T + 1):
      z[t] = min(int(np.searchsorted(self._cum_A[z[t - 1]], u[t, 0], side="right")), K - 1)
      x[t - 1] = min(int(np.searchsorted(self._cum_B[z[t]], u[t, 1], side="right")), M - 1)
    return z, x

  def forward(self, x_NxT: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Beliefs b_t (N, T+1, K), next-symbol distributions p_t (N, T+1, M) for t = 0..T, and the
    log-likelihood log P(x_1..x_T) (N,), by the normalised forward recursion."""
    x_NxT = np.asarray(x_NxT)
    N, T = x_NxT.shape
    b = np.empty((N, T + 1, self.n_states))
    b[:, 0] = self.pi
    loglik = np.zeros(N)
    for t in range(1, T + 1):
      u_NxK = (b[:, t - 1] @ self.A) * self.B[:, x_NxT[:, t - 1]].T
      c_N = u_NxK.sum(axis=1)
      b[:, t] = u_NxK / c_N[:, None]
      loglik += np.log(c_N)
    return b, b @ self.A @ self.B, loglik


@functools.lru_cache(maxsize=8)
def _hmm(n_states: int, n_symbols: int, alpha_a: float, alpha_b: float, seed: int) -> HMM:
  rng = np.random.default_rng([seed, 7])
  A = rng.dirichlet(np.full(n_states, alpha_a), size=n_states)
  B = rng.dirichlet(np.full(n_symbols, alpha_b), size=n_states)
  return HMM(np.full(n_states, 1.0 / n_states), A, B)


def _check(data_cfg: ml_collections.ConfigDict) -> None:
  for key in ("n_states", "n_symbols", "seq_len"):
    need(int(data_cfg[key]) >= 1, f"data.{key}", data_cfg[key], "must be >= 1")
  for key in ("transition_concentration", "emission_concentration"):
    need(float(data_cfg[key]) > 0, f"data.{key}", data_cfg[key], "must be > 0")


def hmm(data_cfg: ml_collections.ConfigDict) -> HMM:
  """The configured HMM (a pure function of the data config)."""
  _check(data_cfg)
  return _hmm(int(data_cfg.n_states), int(data_cfg.n_symbols), float(data_cfg.transition_concentration),
              float(data_cfg.emission_concentration), int(data_cfg.hmm_seed))


def info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  _check(data_cfg)
  M = int(data_cfg.n_symbols)
  return DatasetInfo(vocab_size=M + 1, eos_id=M, pad_id=M, row_len=int(data_cfg.seq_len) + 1)


def row_fields(x_T: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
  """The batch-contract fields of one sequence: tokens [EOS, x_1 .. x_T], every symbol a target."""
  return pack_row_fields(np.concatenate([[eos_id], x_T]).astype(np.int32), eos_id, context_length=None)


class HMMSource:
  """Rows of one split; a grain RandomAccessDataSource (pure function of (config, seed, split, index))."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, *, split: str, seed: int):
    self.hmm, self.T, self.eos_id = hmm(data_cfg), int(data_cfg.seq_len), int(data_cfg.n_symbols)
    self.key = (int(data_cfg.data_seed), 0, int(seed)) if split == "train" else (int(data_cfg.data_seed), 1)
    self.num_rows = int(data_cfg.num_rows if split == "train" else data_cfg.eval_rows)

  def __len__(self) -> int:
    return self.num_rows

  def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(z_0..z_T, x_1..x_T) of row `index`."""
    return self.hmm.sample(np.random.default_rng([*self.key, index]), self.T)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if not 0 <= index < self.num_rows:
      raise IndexError(f"row {index} out of range for {self.num_rows} rows")
    return row_fields(self.sequence(index)[1], self.eos_id)


def make_source(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int) -> HMMSource:
  need(split in SPLITS, "split", split, f"expected one of {SPLITS}")
  key = "num_rows" if split == "train" else "eval_rows"
  need(int(data_cfg[key]) >= 1, f"data.{key}", data_cfg[key], "must be >= 1")
  need(seed >= 0, "seed", seed, "must be >= 0")
  return HMMSource(data_cfg, split=split, seed=seed)
