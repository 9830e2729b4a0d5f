"""Vocabulary-wide losses from hidden states and the head, fused chunk by chunk over positions.

`head_losses` takes the trunk's states h (B, P, D), the head (D, V), the next-token targets and, for
NextLat, K rolled-out states aligned to the same positions (student k at position s predicts the teacher
at s). It returns the masked sums of the next-token CE and of each student's token-space term (the KL to
the teacher's distribution at s, or CE against the target at s), and never holds more than a few
(B, chunk, V) arrays: a `lax.scan` visits `chunk` positions of every row at a time. Under
differentiation a custom VJP computes each chunk's gradients (wrt h, the students and the head) in the
same pass that computes its loss (as fused linear-cross-entropy kernels do), so the backward pass only
scales them: no logits are kept or recomputed, the teacher's logits and log-partition are computed once
per chunk and shared by the CE and every rollout step, and the matmul count equals the unfused one
(CE: logits, dh, dW; each student: logits, dh, plus dW when the head is trained by that term). The
residuals are the gradients themselves: (B, P, D) per state array and one (D, V) head gradient (K + 1
of them when the students train the head, `objective.kl_frozen_head=False`, each term having its own
cotangent).
Without differentiation (evaluation) the scan computes the losses only.

`chunk=0` is the unfused reference: whole rows at once, differentiated by JAX (losses.py's formulas).

Vocab-parallel: every chunk's logits are constrained to ("activation_batch", "activation_length",
"activation_vocab") and the head's gradient to the head's ("embed", "vocab"), so under the default rules
the head and the logits are sharded over `tensor` and the partitioner combines the per-shard max, sum of
exponentials and target logit across that axis. The target logit is a masked sum over the vocabulary,
not a gather, for the same reason.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from nextlat_jax.models.transformer import unembed
from nextlat_jax.objectives.losses import denominator, forward_kl, token_cross_entropy

Array = jax.Array
Constrain = Callable[[Array, tuple], Array]
LOGIT_AXES = ("activation_batch", "activation_length", "activation_vocab")
TOKEN_LOSSES = ("kl", "ce")


def _no_constraint(x: Array, names: tuple) -> Array:
  del names
  return x


def _to_chunks(x: Array, chunk: int, axis: int) -> Array:
  """x with positions on `axis` -> (n, ...) chunks of `chunk` positions, zero-padded at the end."""
  P = x.shape[axis]
  n = -(-P // chunk)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n * chunk - P)
  x = jnp.pad(x, pad)
  x = x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _from_chunks(x: Array, P: int, axis: int) -> Array:
  """The inverse of `_to_chunks` (the padding dropped)."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, P, axis=axis)


def head_losses(h_BxPxD: Array, head_DxV: Array, targets_BxP: Array, ce_mask_BxP: Array,
                students_KxBxPxD: Array | None = None, student_masks_KxBxP: Array | None = None, *,
                token_loss: str = "kl", train_student_head: bool = False, dtype: Any = jnp.float32,
                chunk: int = 0, constrain: Constrain = _no_constraint) -> tuple[Array, Array]:
  """(sum of CE over ce_mask, (K,) sums of each student's term over its mask), float32.

  CE: -log softmax(h @ W)[target]. Student k's term at position s: "kl": KL(softmax(h_s @ W) ||
  softmax(student_s @ W)) with the teacher side constant; "ce": -log softmax(student_s @ W)[target_s].
  The student's head is constant unless train_student_head. Masks are bool or float weights.
  """
  if token_loss not in TOKEN_LOSSES:
    raise ValueError(f"token_loss={token_loss!r}: must be one of {TOKEN_LOSSES}")
  B, P, D = h_BxPxD.shape
  if students_KxBxPxD is None:
    students_KxBxPxD = jnp.zeros((0, B, P, D), h_BxPxD.dtype)
    student_masks_KxBxP = jnp.zeros((0, B, P), jnp.float32)
  ce_mask_BxP = ce_mask_BxP.astype(jnp.float32)
  student_masks_KxBxP = student_masks_KxBxP.astype(jnp.float32)
  args = (h_BxPxD, head_DxV, students_KxBxPxD, targets_BxP, ce_mask_BxP, student_masks_KxBxP)
  if chunk <= 0:
    return _unfused(*args, token_loss=token_loss, train_student_head=train_student_head, dtype=dtype,
                    constrain=constrain)
  return _fused(min(chunk, P), token_loss, train_student_head, dtype, constrain)(*args)


def head_cross_entropy(h_BxPxD: Array, head_DxV: Array, targets_BxP: Array, mask_BxP: Array,
                       count: Array | None = None, **options: Any) -> Array:
  """The masked mean of -log softmax(h @ W)[target]: the CE sum / max(count, 1), count defaulting to
  the mask's (as `losses.masked_mean`). options: head_losses' keywords (dtype, chunk, constrain)."""
  return head_losses(h_BxPxD, head_DxV, targets_BxP, mask_BxP, **options)[0] / denominator(count, mask_BxP)


def _logits(h_BxCxD: Array, head_DxV: Array, dtype: Any, constrain: Constrain) -> Array:
  return constrain(unembed(h_BxCxD, head_DxV, dtype), LOGIT_AXES)


def _one_hot(targets: Array, V: int, constrain: Constrain) -> Array:
  return constrain((jnp.arange(V, dtype=targets.dtype) == targets[..., None]).astype(jnp.float32), LOGIT_AXES)


def _unfused(h, head, students, targets, ce_mask, student_masks, *, token_loss, train_student_head, dtype,
             constrain):
  """The reference: whole (B, P, V) arrays, JAX's autodiff."""
  sg = jax.lax.stop_gradient
  z = _logits(h, head, dtype, constrain)
  ce = jnp.sum(token_cross_entropy(z, targets) * ce_mask)
  s_head = head if train_student_head else sg(head)
  toks = []
  for k in range(students.shape[0]):
    zs = _logits(students[k], s_head, dtype, constrain)
    per = forward_kl(sg(z), zs) if token_loss == "kl" else token_cross_entropy(zs, targets)
    toks.append(jnp.sum(per * student_masks[k]))
  return ce, jnp.stack(toks) if toks else jnp.zeros((0,), jnp.float32)


def _fused(chunk: int, token_loss: str, train_student_head: bool, dtype: Any, constrain: Constrain):
  """head_losses over chunks of positions with a custom VJP (gradients computed in the forward scan)."""
  kl = token_loss == "kl"

  def chunk_terms(head, h_c, s_KxBxCxD, t_c, m_c, ms_KxBxC, grads: bool):
    """One chunk: (ce sum, (K,) term sums) and, if grads, (dh_c, ds_c, dW). The students are visited by
    an inner scan, so one student's (B, chunk, V) arrays are live at a time."""
    V, K = head.shape[1], s_KxBxCxD.shape[0]
    z = _logits(h_c, head, dtype, constrain)
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    onehot = _one_hot(t_c, V, constrain)
    ce = jnp.sum((lse[..., 0] - jnp.sum(onehot * z, axis=-1)) * m_c)
    log_q = z - lse
    q = jnp.exp(log_q)

    def student(_, x):
      s_k, ms_k = x
      zs = _logits(s_k, head, dtype, constrain)
      log_p = zs - jax.nn.logsumexp(zs, axis=-1, keepdims=True)
      per = jnp.sum(q * (log_q - log_p), axis=-1) if kl else -jnp.sum(onehot * log_p, axis=-1)
      tok = jnp.sum(per * ms_k)
      if not grads:
        return None, tok
      dz_k = (jnp.exp(log_p) - (q if kl else onehot)) * ms_k[..., None]
      out = (tok, _back(dz_k, head, dtype))
      return None, out + ((_outer(s_k, dz_k, dtype),) if train_student_head else ())

    if K:
      ys = _scan(student, None, (s_KxBxCxD, ms_KxBxC))[1]
    else:
      ys = (jnp.zeros((0,), jnp.float32), jnp.zeros(s_KxBxCxD.shape, jnp.float32), jnp.zeros((0, *head.shape)))
    if not grads:
      return ce, ys if K else ys[0]
    toks, ds = ys[0], ys[1]
    dz = (q - onehot) * m_c[..., None]
    # The head's gradient: the CE's, then (train_student_head) each student term's, kept apart because
    # each term gets its own cotangent in the backward pass.
    dW = _outer(h_c, dz, dtype)[None]
    if train_student_head:
      dW = jnp.concatenate([dW, ys[2]])
    return ce, toks, _back(dz, head, dtype), ds, constrain(dW, (None, "embed", "vocab"))

  def scan(head, h, s, t, m, ms, grads: bool):
    xs = (_to_chunks(h, chunk, 1), _to_chunks(s, chunk, 2), _to_chunks(t, chunk, 1), _to_chunks(m, chunk, 1),
          _to_chunks(ms, chunk, 2))
    K = s.shape[0]
    zero = (jnp.zeros((), jnp.float32), jnp.zeros((K,), jnp.float32))
    if grads:
      zero = zero + (jnp.zeros((1 + (K if train_student_head else 0), *head.shape), jnp.float32),)

    def step(carry, x):
      h_c, s_c, t_c, m_c, ms_c = x
      out = chunk_terms(head, h_c, s_c, t_c, m_c, ms_c, grads)
      if not grads:
        return (carry[0] + out[0], carry[1] + out[1]), None
      ce, toks, dh_c, ds_c, dW = out
      return (carry[0] + ce, carry[1] + toks, carry[2] + dW), (dh_c, ds_c)

    carry, ys = _scan(step, zero, xs)
    if not grads:
      return carry
    P = h.shape[1]
    dh = _from_chunks(ys[0], P, 1)
    ds = _from_chunks(ys[1], P, 2) if K else jnp.zeros(s.shape, jnp.float32)
    return carry, (dh, ds)

  @jax.custom_vjp
  def fused(h, head, students, targets, ce_mask, student_masks):
    return scan(head, h, students, targets, ce_mask, student_masks, grads=False)

  def fwd(h, head, students, targets, ce_mask, student_masks):
    (ce, toks, dW), (dh, ds) = scan(head, h, students, targets, ce_mask, student_masks, grads=True)
    return (ce, toks), (dh.astype(h.dtype), ds.astype(students.dtype), dW.astype(head.dtype), targets,
                        ce_mask, student_masks)

  def bwd(res, cotangents):
    dh, ds, dW, targets, ce_mask, student_masks = res
    g_ce, g_toks = cotangents
    # Every gradient is linear in its term's cotangent; the KL's teacher side is constant, so h gets
    # only the CE's.
    g_W = jnp.concatenate([g_ce[None], g_toks]) if train_student_head else g_ce[None]
    return (dh * g_ce.astype(dh.dtype), jnp.einsum("k,kdv->dv", g_W.astype(dW.dtype), dW),
            ds * g_toks[:, None, None, None].astype(ds.dtype), None, jnp.zeros_like(ce_mask),
            jnp.zeros_like(student_masks))

  fused.defvjp(fwd, bwd)
  return fused


def _back(dz: Array, head: Array, dtype: Any) -> Array:
  """dz @ W^T: the gradient wrt the states of logits = states @ W."""
  return jnp.einsum("...v,dv->...d", dz.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)


def _outer(h: Array, dz: Array, dtype: Any) -> Array:
  """states^T dz summed over rows and positions: the gradient wrt W of logits = states @ W."""
  return jnp.einsum("bcd,bcv->dv", h.astype(dtype), dz.astype(dtype), preferred_element_type=jnp.float32)


def _scan(f: Callable, init: Any, xs: Any):
  """jax.lax.scan, or for a single iteration f applied directly (a while loop less to compile)."""
  if jax.tree.leaves(xs)[0].shape[0] != 1:
    return jax.lax.scan(f, init, xs)
  carry, y = f(init, jax.tree.map(lambda a: a[0], xs))
  return carry, jax.tree.map(lambda a: a[None], y)
