"""Loss building blocks shared by the objectives; float32 throughout."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_mean(x: Array, mask: Array) -> Array:
  """Mean of x over mask (0 when the mask is empty)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x.astype(jnp.float32) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


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
