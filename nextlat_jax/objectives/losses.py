"""Loss building blocks shared by the objectives; float32 throughout."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Counts = dict[str, Array]  # a loss's denominators by term name (see `mask_counts`)


def mask_count(mask: Array) -> Array:
  """The number of set entries of mask, float32 (exact below 2**24): a masked mean's denominator."""
  return jnp.sum(mask.astype(jnp.float32))


def mask_counts(masks: dict[str, Array]) -> Counts:
  """{name: mask_count(mask)}: an objective's `counts(batch)`. Each count is a sum over rows, so the
  counts of a batch are the sums of the counts of any split of its rows (train/step.py relies on it)."""
  return {k: mask_count(m) for k, m in masks.items()}


def denominators(counts: Counts | None) -> Callable[[str], Array | None]:
  """name -> counts[name] (a KeyError for a missing term), or -> None everywhere when counts is None
  (every term then divides by its own mask count)."""
  if counts is None:
    return lambda name: None
  return lambda name: counts[name]


def denominator(count: Array | None, mask: Array) -> Array:
  """max(count, 1), count defaulting to the mask's own count: a masked mean's divisor."""
  return jnp.maximum(mask_count(mask) if count is None else count, 1.0)


def masked_mean(x: Array, mask: Array, count: Array | None = None) -> Array:
  """sum(x over mask) / max(count, 1); count defaults to the mask's own count (the mean over mask, 0
  when empty). Given the count of a larger batch, this batch's share of that batch's mean."""
  return jnp.sum(x.astype(jnp.float32) * mask.astype(jnp.float32)) / denominator(count, mask)


def token_cross_entropy(logits_BxTxV: Array, targets_BxT: Array) -> Array:
  """-log softmax(logits)[target] per position, float32."""
  logits = logits_BxTxV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logit


def forward_kl(teacher_logits: Array, student_logits: Array) -> Array:
  """KL(softmax(teacher) || softmax(student)) summed over the vocabulary, per position."""
  log_q = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)


def smooth_l1(pred: Array, target: Array, beta: float = 1.0) -> Array:
  """Elementwise Smooth L1 (PyTorch's, beta=1 default): 0.5 u^2 / beta if |u| < beta else |u| - beta/2."""
  u = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.where(u < beta, 0.5 * u * u / beta, u - 0.5 * beta)


NEXT_H_LOSSES = ("smooth_l1", "mse", "cosine")


def squared_error(pred: Array, target: Array) -> Array:
  """Elementwise (pred - target)^2, float32."""
  u = pred.astype(jnp.float32) - target.astype(jnp.float32)
  return u * u


def cosine_distance(pred_xD: Array, target_xD: Array, eps: float = 1e-8) -> Array:
  """1 - cos(pred, target) over the last axis, per position (in [0, 2]); the norm product is clamped at eps."""
  p, t = pred_xD.astype(jnp.float32), target_xD.astype(jnp.float32)
  norms = jnp.sqrt(jnp.sum(p * p, axis=-1)) * jnp.sqrt(jnp.sum(t * t, axis=-1))
  return 1.0 - jnp.sum(p * t, axis=-1) / jnp.maximum(norms, eps)


def next_latent_loss(kind: str, pred_BxTxD: Array, target_BxTxD: Array, mask_BxT: Array,
                     count: Array | None = None) -> Array:
  """The next-h regression term of one rollout step, a scalar (`count`: the denominator's number of
  valid positions, by default the mask's, as in `masked_mean`).

  "smooth_l1" (the paper) and "mse": the elementwise loss summed over valid (position, feature) entries
  / (valid positions * D). "cosine": the mean over valid positions of 1 - cos(ĥ, h), not divided by D:
  for ĥ = h + u with u small and orthogonal to h, 1 - cos ≈ |u|^2 / (2 |h|^2), and |h|^2 ≈ D for the
  trunk's RMS-normalised latents (unit norm weights), so it is on the scale of Smooth L1's 0.5 |u|^2 / D.
  "mse" is (ĥ - h)^2, i.e. twice Smooth L1 where |ĥ - h| < 1.
  """
  if kind == "cosine":
    return masked_mean(cosine_distance(pred_BxTxD, target_BxTxD), mask_BxT, count)
  elementwise = {"smooth_l1": smooth_l1, "mse": squared_error}.get(kind)
  if elementwise is None:
    raise ValueError(f"objective.next_h_loss={kind!r}: unknown (known: {', '.join(NEXT_H_LOSSES)})")
  err_BxT = jnp.sum(elementwise(pred_BxTxD, target_BxTxD), axis=-1)
  return masked_mean(err_BxT, mask_BxT, count) / pred_BxTxD.shape[-1]
