"""Effective latent rank (Roy & Vetterli 2007; METRICS.md §6) of a stack of hidden states.

erank(M) = exp(H(p)), p_k = sigma_k / sum_j sigma_j over the singular values of M (no mean-centring),
H(p) = -sum_k p_k ln p_k with 0 ln 0 = 0. Tiny singular values: `small="clamp"` (the reference's
routines and the spec's default) clamps each p_k at >= 1e-12 and discards nothing; `small="discard"`
(the paper's text) drops sigma_k < 1e-12 and renormalises. Both are reported; they differ by <~1e-8
in H. The SVD runs on the host in float64 (METRICS.md: float32 or higher).
"""
from __future__ import annotations

import math

import numpy as np

SMALL = ("clamp", "discard")
TINY = 1e-12


def singular_values(m_NxD: np.ndarray) -> np.ndarray:
  """Singular values of a matrix (float64, descending); rows are samples, no centring."""
  m = np.asarray(m_NxD, dtype=np.float64)
  if m.ndim != 2 or m.size == 0:
    raise ValueError(f"effective rank needs a non-empty 2-D matrix, got shape {m.shape}")
  if not np.all(np.isfinite(m)):
    raise ValueError("effective rank: the hidden-state matrix has non-finite entries")
  return np.linalg.svd(m, compute_uv=False)


def effective_rank(sigma_Q: np.ndarray, small: str = "clamp", tiny: float = TINY) -> float:
  """exp(entropy of the L1-normalised singular values); 0 for an all-zero matrix."""
  if small not in SMALL:
    raise ValueError(f"small={small!r}: expected one of {SMALL}")
  s = np.asarray(sigma_Q, dtype=np.float64)
  if small == "discard":
    s = s[s >= tiny]
  total = s.sum()
  if total <= 0.0:
    return 0.0
  p = s / total
  if small == "clamp":
    p = np.maximum(p, tiny)
  else:
    p = p[p > 0.0]
  return float(math.exp(-np.sum(p * np.log(p))))


def rank_stats(sigma_Q: np.ndarray) -> dict:
  """Effective rank (both tiny-value rules), numerical rank and condition number of a spectrum."""
  s = np.sort(np.asarray(sigma_Q, dtype=np.float64))[::-1]
  s_max, s_min = float(s[0]), float(s[-1])
  return {
      "erank": effective_rank(s, "clamp"),
      "erank_discard": effective_rank(s, "discard"),
      "numerical_rank": int(np.sum(s > max(1e-3, 1e-3 * s_max))),  # METRICS.md §6 "also log"
      "condition_number": s_max / s_min if s_min > 0.0 else None,  # None: singular (sigma_min = 0)
      "sigma_max": s_max,
      "sigma_min": s_min,
      "dim": int(s.size),
  }


def erank_of_batches(h_batches: list[np.ndarray]) -> dict:
  """Per-batch effective rank of hidden states (each (B, T, D) or (N, D)): the first batch (the
  paper's single batch), the mean over all batches (the reference script) and the first spectrum."""
  if not h_batches:
    raise ValueError("effective rank needs at least one batch of hidden states")
  per_batch, spectrum = [], None
  for h in h_batches:
    h = np.asarray(h)
    sigma = singular_values(h.reshape(-1, h.shape[-1]))
    if spectrum is None:
      spectrum = sigma
    per_batch.append(rank_stats(sigma))
  first = per_batch[0]
  return {**first,
          "erank_mean_over_batches": float(np.mean([b["erank"] for b in per_batch])),
          "erank_discard_mean_over_batches": float(np.mean([b["erank_discard"] for b in per_batch])),
          "batches": len(per_batch),
          "spectrum": [float(x) for x in spectrum]}
