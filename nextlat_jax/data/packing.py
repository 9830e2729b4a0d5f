"""Packed rows: document ids, RoPE positions and next-token loss masks (METHOD.md §2).

The batch contract. Every data source yields, and every objective consumes, a dict of int32 numpy
arrays, all of shape (B, L) (or (L,) for a single row), where L = seq_len + 1 is the row length:

- `tokens`: token ids x_0 .. x_{L-1}.
- `segment_ids`: document id of x_t = number of EOS tokens in x_0..x_t inclusive, so an EOS belongs to
  the FOLLOWING document and acts as its BOS. Padding tokens get -1.
- `positions`: RoPE position = t - (index of the most recent EOS at or before t), with a virtual EOS
  at index -1. The first segment of a row therefore starts at position 1 (pos = t + 1), every EOS has
  position 0 and the tokens after it 1, 2, .... Padding gets 0.
- `loss_mask`: 1 iff x_t is a trained next-token (CE) target: t >= 1, x_t is not padding, and, when
  prompt masking is on (context_length >= 0), NOT 1 <= positions[t] <= context_length + 1. EOS targets
  (position 0) are always trained; loss_mask[..., 0] = 0 always. context_length = None or < 0
  disables prompt masking.

Attention may connect s <= t iff segment_ids[s] == segment_ids[t] (block-diagonal causal mask). The
model reads tokens[:, :-1] and predicts tokens[:, 1:]; loss_mask[:, 1:] weights those targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FIELDS = ('tokens', 'segment_ids', 'positions', 'loss_mask')
PAD_SEGMENT_ID = -1


def segment_ids_and_positions(tokens, eos_id, prev_segment=None, prev_position=None):
  """(segment_ids, positions), int32, same shape as `tokens` (a 1-D row or (B, L); numpy in, numpy out,
  jax in (also under jit), jax out).

  The one implementation of the contract's layout. With `prev_segment` / `prev_position` (shape
  tokens.shape[:-1]: the document id and position of the token just before this block, as a KV cache
  holds them) the block continues that document; without, a row starts after a virtual EOS at -1.
  """
  xp = jnp if isinstance(tokens, jax.Array) else np
  tokens = xp.asarray(tokens)
  length = tokens.shape[-1]
  is_eos = tokens == eos_id
  segment_ids = xp.cumsum(is_eos, axis=-1, dtype=xp.int32)
  t_L = xp.arange(length, dtype=xp.int32)
  eos_at = xp.where(is_eos, t_L, -1)
  last_eos = (jax.lax.cummax(eos_at, axis=tokens.ndim - 1) if xp is jnp
              else np.maximum.accumulate(eos_at, axis=-1))
  if prev_segment is None:
    return segment_ids, (t_L - last_eos).astype(xp.int32)  # the virtual EOS at -1 gives t + 1
  segment_ids = xp.asarray(prev_segment, xp.int32)[..., None] + segment_ids
  positions = xp.where(last_eos >= 0, t_L - last_eos, xp.asarray(prev_position, xp.int32)[..., None] + t_L + 1)
  return segment_ids, positions.astype(xp.int32)


def loss_mask(
    positions: np.ndarray, context_length: int | None, valid: np.ndarray | None = None
) -> np.ndarray:
  """Returns the int32 next-token target mask for `positions` (1-D row or (B, L))."""
  positions = np.asarray(positions)
  mask = np.ones(positions.shape, dtype=bool)
  mask[..., 0] = False
  if valid is not None:
    mask &= np.asarray(valid, dtype=bool)
  if context_length is not None and context_length >= 0:
    in_prompt = (positions >= 1) & (positions <= context_length + 1)
    mask &= ~in_prompt
  return mask.astype(np.int32)


def pack_row_fields(
    tokens: np.ndarray,
    eos_id: int,
    context_length: int | None,
    valid: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Returns the four contract fields for packed `tokens` (1-D row or (B, L)); `valid` marks non-pad."""
  tokens = np.asarray(tokens, dtype=np.int32)
  segment_ids, positions = segment_ids_and_positions(tokens, eos_id)
  if valid is not None:
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != tokens.shape:
      raise ValueError(f'valid has shape {valid.shape}, tokens have shape {tokens.shape}')
    segment_ids = np.where(valid, segment_ids, PAD_SEGMENT_ID).astype(np.int32)
    positions = np.where(valid, positions, 0).astype(np.int32)
  return {
      'tokens': tokens,
      'segment_ids': segment_ids,
      'positions': positions,
      'loss_mask': loss_mask(positions, context_length, valid),
  }
